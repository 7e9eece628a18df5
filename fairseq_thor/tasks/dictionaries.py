"""Refuse a data folder without its dictionaries, naming the files and what the folder holds.

``fairseq-preprocess`` writes ``dict.SRC.txt`` and ``dict.TGT.txt`` beside the binarized splits;
fairseq's translation task opens them in ``setup_task`` and, when one is missing, ends
``fairseq-train`` and ``fairseq-generate`` with a raw ``FileNotFoundError`` traceback. The THOR
bilingual task checks first and says which file is missing and how to get it.
"""
import os

from fairseq import utils
from fairseq.data import data_utils

from ..errors import ThorError

SHOWN = 8  # names of the folder's files in the message; the rest are counted


def _listing(folder: str) -> str:
    names = sorted(os.listdir(folder))
    if not names:
        return "it is empty"
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return f"it holds {', '.join(names[:SHOWN])}{more}"


def refuse_missing_dictionaries(cfg):
    """``cfg``: the task's (``data``, ``source_lang``, ``target_lang``)."""
    folder = utils.split_paths(cfg.data)[0]  # fairseq reads the dictionaries from the first path
    if not os.path.isdir(folder):
        raise ThorError(f"data folder {folder} does not exist (the first argument: a fairseq-preprocess "
                        f"output folder)")
    src, tgt = cfg.source_lang, cfg.target_lang
    if src is None or tgt is None:
        src, tgt = data_utils.infer_language_pair(folder)
    if src is None or tgt is None:
        raise ThorError(f"data folder {folder} has no SPLIT.SRC-TGT.* files to tell the language pair "
                        f"from ({_listing(folder)}); pass --source-lang and --target-lang, or binarize "
                        f"the data there with fairseq-preprocess")
    missing = [name for name in (f"dict.{src}.txt", f"dict.{tgt}.txt")
               if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ThorError(f"data folder {folder} has no {' or '.join(dict.fromkeys(missing))} ({_listing(folder)}); "
                        f"fairseq-preprocess --source-lang {src} --target-lang {tgt} writes them with the "
                        f"binarized splits (copy them from the training data folder when decoding elsewhere)")
