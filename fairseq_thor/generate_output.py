"""Reading what ``fairseq-generate`` prints, for the recipes and benchmarks that score it.

fairseq-generate prints one block per sentence, in batch order (by length, not by id):
``S-<id>\\t<source>``, ``T-<id>\\t<reference>``, ``H-<id>\\t<score>\\t<hypothesis>`` (and ``D-``/``P-``
lines). Scoring needs them back in sentence order; one reader here, instead of a regex per script.
"""
from typing import Dict, List


def lines_by_id(text: str, kind: str) -> Dict[int, str]:
    """``{sentence id: text}`` of the ``kind`` lines (``"H"``, ``"T"`` or ``"S"``); a hypothesis'
    score is dropped, and an empty hypothesis or reference is kept as ``""``."""
    prefix = kind + "-"
    found = {}
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        fields = line.split("\t")
        number = fields[0][len(prefix):]
        if not number.isdigit():
            continue  # e.g. a log line that happens to start with "H-"
        text_field = 2 if kind == "H" else 1
        found[int(number)] = fields[text_field] if len(fields) > text_field else ""
    return found


def in_sentence_order(text: str, kind: str) -> List[str]:
    """The ``kind`` lines' texts sorted by sentence id."""
    found = lines_by_id(text, kind)
    return [found[i] for i in sorted(found)]
