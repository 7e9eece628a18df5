#!/usr/bin/env bash
# Decode newstest2014 as fairseq's examples/scaling_nmt does (average of the last 10 epoch
# checkpoints, beam 4, length penalty 0.6), with one random expert per sentence, then print
# detokenized sacreBLEU and the compound-split tokenized BLEU of Vaswani et al. / Ott et al.
# (examples/iwslt14_de_en/score.py, one scorer for both recipes). DRY_RUN=1 prints the commands.
set -euo pipefail
cd "$(dirname "$0")/../.."

WORK=${WORK:-work/wmt16_en_de}
SRC=${SRC:-en}
TGT=${TGT:-de}
DATA=${DATA:-$WORK/data-bin/wmt16_${SRC}_${TGT}_bpe32k}
SAVE_DIR=${SAVE_DIR:-$WORK/checkpoints/thor}
AVERAGE=${AVERAGE:-10}             # average this many last epoch checkpoints; 0: decode CKPT as it is
CKPT=${CKPT:-$SAVE_DIR/checkpoint_best.pt}
# newstest2014's raw text: in the tarball as extracted by prepare.sh, else sacreBLEU fetches wmt14/full
REF=${REF:-$WORK/wmt16_en_de_bpe32k/newstest2014.$TGT}
OUT=${OUT:-$WORK/generate}
INFERENCE=${INFERENCE:-sentence}   # --inference-routing
SEED=${SEED:-1}                    # fixes the random experts: same seed, same translations
EXTRA_ARGS=${EXTRA_ARGS:-}

if [ "$AVERAGE" -gt 0 ]; then
  CKPT=$SAVE_DIR/checkpoint.avg$AVERAGE.pt
  average=(fairseq-thor-average --inputs "$SAVE_DIR" --num-epoch-checkpoints "$AVERAGE" --out "$CKPT")
fi
cmd=(fairseq-generate "$DATA" --user-dir fairseq_thor --task translation_thor
     --path "$CKPT" --gen-subset test --batch-size 128 --beam 4 --lenpen 0.6 --remove-bpe
     --inference-routing "$INFERENCE" --seed "$SEED")
# shellcheck disable=SC2206  # EXTRA_ARGS is a list of flags
cmd+=($EXTRA_ARGS)

if [ -n "${DRY_RUN:-}" ]; then
  [ "$AVERAGE" -gt 0 ] && { printf '%q ' "${average[@]}"; echo; }
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
mkdir -p "$OUT"
if [ "$AVERAGE" -gt 0 ]; then
  "${average[@]}" 2> "$OUT/average.log" || { tail -20 "$OUT/average.log"; exit 1; }
fi
"${cmd[@]}" > "$OUT/gen.out" 2> "$OUT/generate.log" || { tail -20 "$OUT/generate.log"; exit 1; }
if [ ! -s "$REF" ]; then
  REF=$OUT/newstest2014.$TGT
  sacrebleu -t wmt14/full -l "$SRC-$TGT" --echo ref > "$REF"  # downloads the test set once
fi
python examples/iwslt14_de_en/score.py "$OUT/gen.out" --ref "$REF" --lang "$TGT"
