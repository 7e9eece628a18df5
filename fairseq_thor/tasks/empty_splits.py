"""Refuse a data split that holds no sentence, naming it and its files.

``fairseq-preprocess`` writes an empty ``.bin`` for an empty text file, and fairseq then fails in
numpy with ``cannot mmap an empty file`` (plus a second traceback) without saying which split or
file. The THOR tasks check first.
"""
import glob
import os
from typing import Iterable, List, Optional

from fairseq import utils

from ..errors import ThorError

WHAT_TO_DO = {
    "train": "binarize a non-empty training file (fairseq-preprocess --trainpref)",
    "valid": "binarize a non-empty validation file (--validpref), or train with --disable-validation",
    "test": "binarize a non-empty test file (--testpref), or decode another split with --gen-subset",
}


def empty_files(data: str, split: str, pairs: Optional[Iterable[str]] = None) -> List[str]:
    """The ``SPLIT.SRC-TGT.LANG.bin`` files (also ``SPLIT1.*``, ... of a sharded split) that hold
    nothing; with ``pairs`` ("de-en", ...), only the files of those pairs, in either direction."""
    wanted = None if pairs is None else {frozenset(p.split("-")) for p in pairs}
    found = []
    for path in utils.split_paths(data):
        for pattern in (f"{split}.*.bin", f"{split}[0-9]*.*.bin"):
            for f in glob.glob(os.path.join(path, pattern)):
                pair = os.path.basename(f).split(".")[1]
                if os.path.getsize(f) == 0 and (wanted is None or frozenset(pair.split("-")) in wanted):
                    found.append(f)
    return sorted(set(found))


def refuse_empty_split(data: str, split: str, pairs: Optional[Iterable[str]] = None):
    empty = empty_files(data, split, pairs)
    if empty:
        base = split.rstrip("0123456789")
        what_to_do = WHAT_TO_DO.get(base, f"binarize non-empty {split} files")
        raise ThorError(f"the {split} split is empty: {', '.join(empty)} hold no sentence; {what_to_do}")
