#!/usr/bin/env bash
# make demo: German->English THOR on real text from this machine's gettext catalogs, end to end:
# corpus -> sentencepiece -> fairseq-preprocess -> fairseq-train (THOR) -> fairseq-generate ->
# sacreBLEU and sample translations. Every knob is an environment variable (defaults below).
set -euo pipefail
export PYTHONUNBUFFERED=1  # show fairseq's progress as it happens, not when a pipe buffer fills
cd "$(dirname "$0")/../.."

WORK=${WORK:-work/demo}                  # everything the demo writes goes here
SRC=${SRC:-de}; TGT=${TGT:-en}
VOCAB=${VOCAB:-4000}                     # joint sentencepiece vocabulary
TRAIN_MINUTES=${TRAIN_MINUTES:-10}       # wall-clock bound on training (fairseq --stop-time-hours)
MAX_UPDATE=${MAX_UPDATE:-3000}           # update bound (whichever comes first)
NUM_EXPERTS=${NUM_EXPERTS:-2}
ALPHA=${ALPHA:-1.0}                      # --consistency-alpha
CRITERION=${CRITERION:-thor_consistency} # label_smoothed_cross_entropy trains a one-pass baseline
ROUTING=${ROUTING:-sentence}             # --expert-routing (training)
INFERENCE=${INFERENCE:-sentence}         # --inference-routing (decoding)
EXTRA_TRAIN_ARGS=${EXTRA_TRAIN_ARGS:-}
DEVICE_ARGS=$(python -c "import torch; print('' if torch.cuda.is_available() else '--cpu')")

step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

RAW=$WORK/raw SPM=$WORK/spm BIN=$WORK/data-bin CKPT=$WORK/checkpoints OUT=$WORK/generate
mkdir -p "$WORK"

step "1/5 building a $SRC->$TGT corpus from gettext catalogs in /usr/share/locale"
if [ ! -s "$RAW/test.$TGT" ]; then
  python -m fairseq_thor.corpus.gettext_pairs --src "$SRC" --tgt "$TGT" --out "$RAW" 2>/dev/null
fi
wc -l "$RAW"/{train,valid,test}."$SRC" | sed 's/^/    /'

step "2/5 training a joint sentencepiece model (vocab $VOCAB) and encoding"
if [ ! -s "$SPM/test.$TGT" ]; then
  python examples/demo/prepare_spm.py --raw "$RAW" --out "$SPM" --src "$SRC" --tgt "$TGT" --vocab-size "$VOCAB"
fi

step "3/5 binarizing with fairseq-preprocess"
if [ ! -s "$BIN/dict.$TGT.txt" ]; then
  fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" --joined-dictionary --workers 2 \
    --trainpref "$SPM/train" --validpref "$SPM/valid" --testpref "$SPM/test" --destdir "$BIN" \
    2>&1 | grep -E "sents|Wrote" | sed 's/^.*INFO[^]]*] */    /; s/^INFO:[^:]*:/    /'
fi

rm -rf "$CKPT"  # a rerun trains afresh instead of resuming a finished run
step "4/5 training THOR (E=$NUM_EXPERTS, alpha=$ALPHA, $ROUTING routing) for at most $TRAIN_MINUTES min / $MAX_UPDATE updates"
fairseq-train "$BIN" --user-dir fairseq_thor $DEVICE_ARGS \
  --task translation_thor --arch thor_transformer --share-all-embeddings \
  --encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 256 --decoder-embed-dim 256 \
  --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 \
  --encoder-attention-heads 4 --decoder-attention-heads 4 \
  --num-experts "$NUM_EXPERTS" --expert-routing "$ROUTING" --inference-routing "$INFERENCE" \
  --criterion "$CRITERION" --consistency-alpha "$ALPHA" --label-smoothing 0.1 \
  --dropout 0.1 --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 1.0 \
  --lr 3e-3 --lr-scheduler inverse_sqrt --warmup-updates 100 \
  --max-tokens 2048 --max-update "$MAX_UPDATE" --stop-time-hours "$(python -c "print($TRAIN_MINUTES / 60)")" \
  --save-dir "$CKPT" --no-epoch-checkpoints --keep-last-epochs 1 \
  --log-format simple --log-interval 20 --seed 1 $EXTRA_TRAIN_ARGS \
  2>&1 | grep --line-buffered -E "train_inner|valid on|\| train \||done training|Error|error" \
       | sed -u 's/^.*| INFO | //'

step "5/5 decoding the test split with fairseq-generate (beam 5, $INFERENCE routing)"
mkdir -p "$OUT"
fairseq-generate "$BIN" --user-dir fairseq_thor $DEVICE_ARGS --task translation_thor \
  --path "$CKPT/checkpoint_last.pt" --gen-subset test --beam 5 --max-tokens 8000 \
  --max-len-a 1.5 --max-len-b 10 --remove-bpe sentencepiece --inference-routing "$INFERENCE" --seed 1 > "$OUT/test.log" 2>&1 \
  || { tail -20 "$OUT/test.log"; exit 1; }
grep '^H-' "$OUT/test.log" | sed 's/^H-//' | sort -n | cut -f3 > "$OUT/hyp.txt"
grep '^T-' "$OUT/test.log" | sed 's/^T-//' | sort -n | cut -f2 > "$OUT/ref.txt"
grep '^S-' "$OUT/test.log" | sed 's/^S-//' | sort -n | cut -f2 > "$OUT/src.txt"
echo "    decoded $(wc -l < "$OUT/hyp.txt") of $(wc -l < "$RAW/test.$SRC") test sentences"

printf '\n==> sacreBLEU (detokenized, %s->%s test split)\n' "$SRC" "$TGT"
echo "    BLEU  = $(sacrebleu "$OUT/ref.txt" -i "$OUT/hyp.txt" -m bleu -b -w 2)"
echo "    chrF2 = $(sacrebleu "$OUT/ref.txt" -i "$OUT/hyp.txt" -m chrf -b -w 2)"

printf '\n==> five sample translations\n'
paste "$OUT/src.txt" "$OUT/ref.txt" "$OUT/hyp.txt" | awk -F'\t' 'NR % 97 == 1 && n < 5 {n++;
  printf "    SRC: %s\n    REF: %s\n    HYP: %s\n\n", $1, $2, $3}'
echo "outputs: $OUT (hyp.txt, ref.txt, test.log), checkpoints: $CKPT"
