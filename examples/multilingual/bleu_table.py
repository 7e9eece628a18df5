"""sacreBLEU of every model on every direction's test split, as a table (printed, Markdown, JSON).

    python bleu_table.py --raw RAW --generate GEN --models thor dense --out WORK/bleu

Hypotheses come from ``GEN/MODEL/SRC-TGT.log`` (fairseq-generate's output, decoded with
``--remove-bpe sentencepiece``); references are the untouched raw test text, so the score is
detokenized sacreBLEU and unaffected by <unk> pieces in fairseq's ``T-`` lines.
"""
import argparse
import json
import os
import sys
from typing import Dict, List

import sacrebleu

from fairseq_thor.generate_output import in_sentence_order

from prepare import bitext_of

# languages written without spaces between words: sacreBLEU's default 13a tokenizer would score
# whole sentences as single words (its ja-mecab/ko-mecab tokenizers need extra packages)
TOKENIZE = {"zh": "zh", "ja": "char", "ko": "char", "th": "char"}


def hypotheses(log_path: str) -> List[str]:
    """fairseq-generate's H- lines in sentence order."""
    with open(log_path, encoding="utf-8") as f:
        return in_sentence_order(f.read(), "H")


def score(raw: str, generate: str, models: List[str]) -> dict:
    with open(os.path.join(raw, "corpus.json")) as f:
        manifest = json.load(f)
    table: Dict[str, Dict[str, float]] = {}
    sentences: Dict[str, int] = {}
    for direction in manifest["directions"]:
        tgt = direction.split("-")[1]
        reference = os.path.join(raw, f"test.{bitext_of(direction, manifest['bitexts'])}.{tgt}")
        with open(reference, encoding="utf-8") as f:
            refs = [line.rstrip("\n") for line in f]
        sentences[direction] = len(refs)
        table[direction] = {}
        for model in models:
            hyps = hypotheses(os.path.join(generate, model, f"{direction}.log"))
            if len(hyps) != len(refs):  # a partial score would look like a real one
                raise ValueError(f"{model} {direction}: {len(hyps)} hypotheses for {len(refs)} test "
                                 f"sentences; see {generate}/{model}/{direction}.log")
            bleu = sacrebleu.corpus_bleu(hyps, [refs], tokenize=TOKENIZE.get(tgt.split("_")[0], "13a"))
            table[direction][model] = round(bleu.score, 2)
    mean = {model: round(sum(row[model] for row in table.values()) / len(table), 2) for model in models}
    return {"metric": f"sacreBLEU {sacrebleu.__version__}, detokenized, tokenize 13a (zh: zh; ja/ko/th: char)",
            "models": models, "bleu": table, "mean": mean, "test_sentences": sentences}


def markdown(result: dict) -> str:
    """A Markdown table padded to line up as plain text too."""
    models = result["models"]
    rows = [[direction, str(result["test_sentences"][direction]), *(f"{row[m]:.2f}" for m in models)]
            for direction, row in result["bleu"].items()]
    rows.append(["mean", "", *(f"{result['mean'][m]:.2f}" for m in models)])
    header = ["direction", "sentences", *models]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *map(line, rows)]) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", required=True, help="the corpus directory (corpus.json, test.*)")
    parser.add_argument("--generate", required=True, help="directory with MODEL/SRC-TGT.log")
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--out", required=True, help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    try:
        result = score(args.raw, args.generate, args.models)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    table = markdown(result)
    with open(args.out + ".md", "w") as f:
        f.write(f"BLEU on each direction's test split ({result['metric']})\n\n{table}")
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(table.rstrip())


if __name__ == "__main__":
    main()
