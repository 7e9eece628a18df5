"""The fairseq-generate decoding that a CTranslate2 export reproduces, written beside the model.

CTranslate2's translator has its own defaults (beam 2, at most 256 target tokens, inputs cut at
1,024 tokens, no sentencepiece), so the same weights decoded "as shipped" give other translations
than ``fairseq-generate``. What fairseq does, and how CTranslate2 is asked to do the same:

* the source ends with EOS: fairseq's binarized data and ``fairseq-interactive`` append it; the
  converter sets ``add_source_eos`` in the model's config, so callers pass tokens without it;
* at most ``int(max_len_a * (source tokens + EOS) + max_len_b)`` target tokens, and never more than
  the decoder's positions allow (fairseq's ``SequenceGenerator``); fairseq applies the limit of the
  longest source of a batch to the whole batch, the translator applies each sentence's own;
* ``beam`` and ``lenpen``: fairseq divides a finished hypothesis' log-probability by its length
  (EOS included) to the power ``lenpen``, CTranslate2's ``length_penalty`` is that exponent;
* at least ``min_len`` tokens before EOS (fairseq's ``--min-len``, default 1). The rule is the same,
  the scores are not quite: fairseq bans EOS without renormalising, CTranslate2 renormalises the
  other tokens, which shifts every prefix alike at the first step (min_len 1: same ranking) but not
  beyond it, so a larger ``min_len`` can rank hypotheses differently;
* where the length limit binds (a runaway hypothesis), fairseq forces EOS at the last step and
  scores it, CTranslate2 stops without one: the best of the cut hypotheses can differ;
* sentencepiece pieces in and out, joined the way ``--remove-bpe sentencepiece`` does.
"""
import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

FILE = "fairseq_decoding.json"


@dataclass
class DecodeSettings:
    beam: int = 5  # fairseq-generate's defaults
    lenpen: float = 1.0
    max_len_a: float = 0.0
    max_len_b: int = 200
    min_len: int = 1
    max_source_positions: int = 1024  # the model's; longer inputs are refused, not cut
    max_target_positions: int = 1024
    sentencepiece_model: Optional[str] = None  # a file name inside the model folder
    expert: Optional[str] = None  # which expert the dense export kept (for the record)

    def max_decoding_length(self, source_tokens: int) -> int:
        """fairseq's limit for a source of ``source_tokens`` tokens (EOS not counted here)."""
        limit = int(self.max_len_a * (source_tokens + 1) + self.max_len_b)
        return max(1, min(limit, self.max_target_positions - 1))

    def write(self, folder: str):
        with open(os.path.join(folder, FILE), "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def read(cls, folder: str) -> "DecodeSettings":
        with open(os.path.join(folder, FILE), encoding="utf-8") as f:
            return cls(**json.load(f))
