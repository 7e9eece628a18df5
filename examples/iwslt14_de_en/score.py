"""BLEU of a fairseq-generate log, the three ways translation papers report it.

    python score.py GEN_OUT --ref RAW_REFERENCE --lang en [--lowercase]

GEN_OUT is fairseq-generate's output run with ``--remove-bpe``. Printed:

* **sacreBLEU** on detokenized text: hypotheses (``H-`` lines, in sentence-id order) detokenized
  with sacremoses, scored against the raw reference file (untokenized text, one line per test
  sentence). ``--lowercase`` for a lowercased model (IWSLT'14 as prepared by fairseq's recipe).
  The number to compare across papers; the signature is printed with it.
* **tokenized BLEU**: hypotheses against fairseq's ``T-`` lines (the tokenized reference with BPE
  removed), no further tokenization: what fairseq-generate, fairseq-score and multi-bleu.perl print,
  and what IWSLT'14 results are usually quoted in.
* **compound-split tokenized BLEU**: the same after writing every in-word hyphen as
  ``##AT##-##AT##`` on both sides (fairseq's scripts/compound_split_bleu.sh, from tensor2tensor's
  get_ende_bleu.sh): the WMT En-De number of Vaswani et al. and Ott et al.; higher than the plain
  tokenized BLEU, comparable only with other compound-split scores.

It refuses to score when fairseq-generate decoded fewer (or more) sentences than the reference has.
The detokenized hypotheses are written to GEN_OUT.detok.
"""
import argparse
import re
import sys
from typing import Dict, List, Tuple

import sacrebleu

from fairseq_thor.generate_output import lines_by_id

HYPHEN = re.compile(r"(\S)-(\S)")


def read_generate(path: str) -> Tuple[List[str], List[str]]:
    """(hypotheses, tokenized references) from a fairseq-generate log, in sentence-id order."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    hyps, refs = lines_by_id(text, "H"), lines_by_id(text, "T")
    if hyps.keys() != refs.keys():
        raise ValueError(f"{path}: {len(hyps)} hypotheses but {len(refs)} references")
    order = sorted(hyps)
    return [hyps[i] for i in order], [refs[i] for i in order]


def compound_split(line: str) -> str:
    return HYPHEN.sub(r"\1 ##AT##-##AT## \2", line)


def detokenize(lines: List[str], lang: str) -> List[str]:
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang=lang)
    return [detok.detokenize(line.split()) for line in lines]  # also undoes &apos; &quot; ...


def tokenized_bleu(hyps: List[str], refs: List[str]) -> float:
    # tokenize="none", no smoothing: multi-bleu.perl's and fairseq-score's corpus BLEU
    return sacrebleu.corpus_bleu(hyps, [refs], tokenize="none", smooth_method="none", force=True).score


def score(gen_out: str, ref_path: str, lang: str, lowercase: bool = False) -> Dict[str, object]:
    hyps, tok_refs = read_generate(gen_out)
    with open(ref_path, encoding="utf-8") as f:
        raw_refs = [line.rstrip("\n") for line in f]
    if len(hyps) != len(raw_refs):
        raise ValueError(f"error: {gen_out} holds {len(hyps)} translations but {ref_path} has "
                         f"{len(raw_refs)} lines: every test sentence must be decoded once")
    detok = detokenize(hyps, lang)
    with open(gen_out + ".detok", "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in detok)
    metric = sacrebleu.metrics.BLEU(lowercase=lowercase)
    bleu = metric.corpus_score(detok, [raw_refs])
    return {
        "sentences": len(hyps),
        "sacrebleu": bleu.score,
        "signature": str(metric.get_signature()),
        "tokenized_bleu": tokenized_bleu(hyps, tok_refs),
        "compound_split_bleu": tokenized_bleu([compound_split(h) for h in hyps],
                                              [compound_split(r) for r in tok_refs]),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gen_out", help="fairseq-generate output (run with --remove-bpe)")
    parser.add_argument("--ref", required=True, help="raw (untokenized) reference, one line per sentence")
    parser.add_argument("--lang", required=True, help="target language, for the detokenizer")
    parser.add_argument("--lowercase", action="store_true", help="case-insensitive sacreBLEU (lowercased models)")
    args = parser.parse_args(argv)
    try:
        result = score(args.gen_out, args.ref, args.lang, args.lowercase)
    except ValueError as e:
        sys.exit(str(e))
    print(f"sentences:                      {result['sentences']}")
    print(f"sacreBLEU (detokenized):        {result['sacrebleu']:.2f}  ({result['signature']})")
    print(f"tokenized BLEU:                 {result['tokenized_bleu']:.2f}")
    print(f"tokenized BLEU, compound split: {result['compound_split_bleu']:.2f}")


if __name__ == "__main__":
    main()
