#!/usr/bin/env bash
# Decode the IWSLT'14 test set with a trained THOR model (beam 5, one random expert per sentence, as
# in the paper) and print detokenized sacreBLEU, tokenized BLEU and compound-split tokenized BLEU
# (score.py says which is which). DRY_RUN=1 prints the fairseq-generate command instead.
set -euo pipefail
cd "$(dirname "$0")/../.."

WORK=${WORK:-work/iwslt14_de_en}
SRC=${SRC:-de}
TGT=${TGT:-en}
DATA=${DATA:-$WORK/data-bin/iwslt14.tokenized.$SRC-$TGT}
CKPT=${CKPT:-$WORK/checkpoints/thor/checkpoint_best.pt}
REF=${REF:-$WORK/text/raw/test.$TGT}   # untokenized test text written by prepare.py
OUT=${OUT:-$WORK/generate}
INFERENCE=${INFERENCE:-sentence}       # --inference-routing; the paper's IWSLT setting is sentence
BEAM=${BEAM:-5}
SEED=${SEED:-1}                        # fixes the random experts: same seed, same translations
EXTRA_ARGS=${EXTRA_ARGS:-}

cmd=(fairseq-generate "$DATA" --user-dir fairseq_thor --task translation_thor
     --path "$CKPT" --gen-subset test --batch-size 128 --beam "$BEAM" --remove-bpe
     --inference-routing "$INFERENCE" --seed "$SEED")
# shellcheck disable=SC2206  # EXTRA_ARGS is a list of flags
cmd+=($EXTRA_ARGS)

if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
mkdir -p "$OUT"
"${cmd[@]}" > "$OUT/gen.out" 2> "$OUT/generate.log" || { tail -20 "$OUT/generate.log"; exit 1; }
# lowercased model (fairseq's IWSLT recipe lowercases), so sacreBLEU is case-insensitive (case:lc)
python examples/iwslt14_de_en/score.py "$OUT/gen.out" --ref "$REF" --lang "$TGT" --lowercase
