"""An evaluation split with a sentence longer than the model's positions is refused in
one line that names the sentences, before anything is decoded.

fairseq raises ``Size of sample #N is invalid`` deep in its batching, with a traceback, or with
``--skip-invalid-size-inputs-valid-test`` leaves the sentences out. The THOR tasks promise that every
sentence of a validation or test split is evaluated, so they neither skip nor truncate silently.
Truncating would have been the other choice; it was not taken because the hypothesis of a cut
source no longer translates its reference, and a score over such pairs measures something else
without saying so. The message names the sentences (id, source and target length) and the ways
out: shorten or split them in the data, or opt in to fairseq's skip, which then logs how many it
left out. Training data is left to fairseq (it skips over-long training pairs with a warning).
"""
import numpy as np

from ..errors import ThorError

SHOWN = 5  # sentences named in the message; the rest are counted


def refuse_overlong(dataset, max_positions, split: str):
    if max_positions is None or not hasattr(dataset, "filter_indices_by_size"):
        return
    _, ignored = dataset.filter_indices_by_size(np.arange(len(dataset), dtype=np.int64), max_positions)
    if len(ignored) == 0:
        return
    sizes = getattr(dataset, "src_sizes", None), getattr(dataset, "tgt_sizes", None)
    named = []
    for i in list(ignored)[:SHOWN]:
        src = "?" if sizes[0] is None else int(sizes[0][i])
        tgt = "" if sizes[1] is None else f" / {int(sizes[1][i])}"
        named.append(f"#{i} ({src}{tgt} tokens)")
    more = f" and {len(ignored) - SHOWN} more" if len(ignored) > SHOWN else ""
    raise ThorError(
        f"the {split} split has {len(ignored)} sentence(s) longer than the model's positions "
        f"{tuple(max_positions) if isinstance(max_positions, (tuple, list)) else max_positions} "
        f"(source / target): {', '.join(named)}{more}; every sentence of an evaluation split is "
        f"evaluated, none skipped or cut silently: shorten or split them in the data, or pass "
        f"--skip-invalid-size-inputs-valid-test to leave them out (fairseq logs how many)")

