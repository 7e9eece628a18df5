#!/usr/bin/env bash
# make demo: German->English THOR on real text from this machine's gettext catalogs, end to end:
# corpus -> sentencepiece -> fairseq-preprocess -> fairseq-train (THOR) -> fairseq-generate ->
# sacreBLEU and sample translations. Every knob is an environment variable (defaults below; how
# they were chosen is in examples/demo/README.md).
set -euo pipefail
export PYTHONUNBUFFERED=1  # show fairseq's progress as it happens, not when a pipe buffer fills
# fairscale's import-time deprecation warnings (4 lines before anything else; fairseq_thor/compat.py)
export PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore::FutureWarning:fairscale.experimental.nn.offload"
cd "$(dirname "$0")/../.."

WORK=${WORK:-work/demo}                  # everything the demo writes goes here
SRC=${SRC:-de}; TGT=${TGT:-en}
VOCAB=${VOCAB:-8000}                     # joint sentencepiece vocabulary
MAX_UPDATE=${MAX_UPDATE:-800}            # training length in updates (the main bound)
TRAIN_MINUTES=${TRAIN_MINUTES:-25}       # wall-clock guard on training (fairseq --stop-time-hours)
NUM_EXPERTS=${NUM_EXPERTS:-2}
ALPHA=${ALPHA:-1.0}                      # --consistency-alpha
ALPHA_WARMUP=${ALPHA_WARMUP:-0}          # --consistency-alpha-warmup-updates
CRITERION=${CRITERION:-thor_consistency} # label_smoothed_cross_entropy trains a one-pass baseline
ROUTING=${ROUTING:-sentence}             # --expert-routing (training)
INFERENCE=${INFERENCE:-sentence}         # --inference-routing (decoding)
LAYERS=${LAYERS:-3}; EMBED=${EMBED:-256}; FFN=${FFN:-512}; HEADS=${HEADS:-4}
LR=${LR:-2e-3}; WARMUP=${WARMUP:-200}; DROPOUT=${DROPOUT:-0.1}; MAX_TOKENS=${MAX_TOKENS:-2048}
SEED=${SEED:-1}; LOG_INTERVAL=${LOG_INTERVAL:-25}  # updates between progress lines
EXTRA_TRAIN_ARGS=${EXTRA_TRAIN_ARGS:-}
EXTRA_GENERATE_ARGS=${EXTRA_GENERATE_ARGS:-}  # e.g. --fp16 on a GPU
DATA_ONLY=${DATA_ONLY:-0}                # 1: stop after building the corpus (benchmarks/gpu/bundle.sh)
EXPECTED_MINUTES=14                      # measured with the defaults on 2 idle CPU cores (README)
DEVICE_ARGS=$(python -c "import torch; print('' if torch.cuda.is_available() else '--cpu')")

step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

RAW=$WORK/raw SPM=$WORK/spm-$VOCAB BIN=$WORK/data-bin-$VOCAB CKPT=$WORK/checkpoints OUT=$WORK/generate
mkdir -p "$WORK"
START=$(date +%s)
echo "make demo: about $EXPECTED_MINUTES minutes with the defaults on 2 idle CPU cores (less on a GPU);"
echo "training shows an ETA for this machine. Outputs go to $WORK/."

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

[ "$DATA_ONLY" = 1 ] && { echo "corpus ready in $WORK (DATA_ONLY=1)"; exit 0; }

rm -rf "$CKPT"  # a rerun trains afresh instead of resuming a finished run
step "4/5 training THOR (E=$NUM_EXPERTS, alpha=$ALPHA, $ROUTING routing): $MAX_UPDATE updates, at most $TRAIN_MINUTES min"
fairseq-train "$BIN" --user-dir fairseq_thor $DEVICE_ARGS \
  --task translation_thor --arch thor_transformer --share-all-embeddings \
  --encoder-layers "$LAYERS" --decoder-layers "$LAYERS" --encoder-embed-dim "$EMBED" --decoder-embed-dim "$EMBED" \
  --encoder-ffn-embed-dim "$FFN" --decoder-ffn-embed-dim "$FFN" \
  --encoder-attention-heads "$HEADS" --decoder-attention-heads "$HEADS" \
  --encoder-normalize-before --decoder-normalize-before \
  --num-experts "$NUM_EXPERTS" --expert-routing "$ROUTING" --inference-routing "$INFERENCE" \
  --criterion "$CRITERION" --consistency-alpha "$ALPHA" --label-smoothing 0.1 \
  --dropout "$DROPOUT" --weight-decay 0.0001 --optimizer adam --adam-betas '(0.9, 0.98)' \
  --lr "$LR" --lr-scheduler inverse_sqrt --warmup-updates "$WARMUP" \
  --max-tokens "$MAX_TOKENS" --max-update "$MAX_UPDATE" --stop-time-hours "$(python -c "print($TRAIN_MINUTES / 60)")" \
  --save-dir "$CKPT" --no-epoch-checkpoints --keep-last-epochs 1 \
  --log-format simple --log-interval "$LOG_INTERVAL" --seed "$SEED" $EXTRA_TRAIN_ARGS \
  2>&1 | tee "$WORK/train.log" | python examples/demo/progress.py --max-update "$MAX_UPDATE" --minutes "$TRAIN_MINUTES"
[ -s "$CKPT/checkpoint_last.pt" ] || { echo "training wrote no checkpoint; see $WORK/train.log"; exit 1; }
# the time guard can stop training before MAX_UPDATE (a slower machine): say so, and what it takes
REACHED=$(grep -oE "num_updates[ =][0-9]+" "$WORK/train.log" | tail -1 | grep -oE "[0-9]+$" || true)
SHORT=""
if [ "${REACHED:-0}" -lt "$MAX_UPDATE" ]; then
  NEEDED=$(python -c "
import re, sys
seconds = re.findall(r'done training in ([0-9.]+) seconds', open(sys.argv[1]).read())
print(int(float(seconds[-1]) * $MAX_UPDATE / max(${REACHED:-0}, 1) / 60) + 2 if seconds else '?')" "$WORK/train.log")
  SHORT=" after only ${REACHED:-0} of $MAX_UPDATE updates"
  echo "    NOTE: the TRAIN_MINUTES=$TRAIN_MINUTES guard stopped training after ${REACHED:-0} of $MAX_UPDATE updates:"
  echo "    this machine is slower than the README's (or busy). The BLEU below is of that shorter run, not"
  echo "    the README's ~32 after $MAX_UPDATE updates; for that, rerun with TRAIN_MINUTES=$NEEDED (about"
  echo "    that many minutes of training here) or on an idle machine."
fi

step "5/5 decoding the test split with fairseq-generate (beam 5, $INFERENCE routing)"
mkdir -p "$OUT"
fairseq-generate "$BIN" --user-dir fairseq_thor $DEVICE_ARGS --task translation_thor \
  --path "$CKPT/checkpoint_last.pt" --gen-subset test --beam 5 --max-tokens 8000 \
  --max-len-a 1.5 --max-len-b 10 --remove-bpe sentencepiece --inference-routing "$INFERENCE" --seed 1 $EXTRA_GENERATE_ARGS > "$OUT/test.log" 2>&1 \
  || { tail -20 "$OUT/test.log"; exit 1; }
grep '^H-' "$OUT/test.log" | sed 's/^H-//' | sort -n | cut -f3 > "$OUT/hyp.txt"
grep '^T-' "$OUT/test.log" | sed 's/^T-//' | sort -n | cut -f2 > "$OUT/ref.txt"
grep '^S-' "$OUT/test.log" | sed 's/^S-//' | sort -n | cut -f2 > "$OUT/src.txt"
echo "    decoded $(wc -l < "$OUT/hyp.txt") of $(wc -l < "$RAW/test.$SRC") test sentences"

printf '\n==> sacreBLEU (detokenized, %s->%s test split)%s\n' "$SRC" "$TGT" "$SHORT"
echo "    BLEU  = $(sacrebleu "$OUT/ref.txt" -i "$OUT/hyp.txt" -m bleu -b -w 2)"
echo "    chrF2 = $(sacrebleu "$OUT/ref.txt" -i "$OUT/hyp.txt" -m chrf -b -w 2)"

printf '\n==> five sample translations\n'
paste "$OUT/src.txt" "$OUT/ref.txt" "$OUT/hyp.txt" | awk -F'\t' 'NR % 97 == 1 && n < 5 {n++;
  printf "    SRC: %s\n    REF: %s\n    HYP: %s\n\n", $1, $2, $3}'
echo "outputs: $OUT (hyp.txt, ref.txt, test.log), checkpoints: $CKPT, training log: $WORK/train.log"
printf '\n==> translate your own sentences with this model (README, "Serving")\n'
echo "    fairseq-interactive $BIN --user-dir fairseq_thor --task translation_thor --path $CKPT/checkpoint_last.pt \\"
echo "        --beam 5 --bpe sentencepiece --sentencepiece-model $SPM/spm.model <<< \"Die Datei wurde nicht gefunden.\""
echo "    python -c 'from fairseq_thor.models.thor_transformer import ThorTransformerModel as M; \\"
echo "        m = M.from_pretrained(\"$CKPT\", checkpoint_file=\"checkpoint_last.pt\", data_name_or_path=\"$BIN\", \\"
echo "        bpe=\"sentencepiece\", sentencepiece_model=\"$SPM/spm.model\", user_dir=\"fairseq_thor\"); \\"
echo "        print(m.translate([\"Die Datei wurde nicht gefunden.\"], beam=5)[0])'"
echo "total time: $(( ($(date +%s) - START) / 60 )) min $(( ($(date +%s) - START) % 60 )) s"
