#!/usr/bin/env bash
# Many-to-many THOR on real text from this machine's gettext catalogs, end to end:
# corpus (X<->en, and X<->Y through English) -> one joint sentencepiece model -> one data-bin with a
# joined dictionary -> fairseq-train THOR (and a dense transformer of the same active size) ->
# fairseq-generate on every direction's test split -> a sacreBLEU table (directions x models).
# Every knob is an environment variable; the defaults take about 34 minutes on 2 CPU cores (README.md):
set -euo pipefail
export PYTHONUNBUFFERED=1  # show fairseq's progress as it happens, not when a pipe buffer fills
# fairscale's import-time deprecation warnings (4 lines before anything else; fairseq_thor/compat.py)
export PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore::FutureWarning:fairscale.experimental.nn.offload"
cd "$(dirname "$0")/../.."

WORK=${WORK:-work/multilingual}          # everything the recipe writes goes here
LANGS=${LANGS:-de fr es}                 # languages besides English (gettext codes)
EN_DIRECTIONS=${EN_DIRECTIONS:-both}     # X->en and en->X: both | to-en | from-en
PIVOT_PAIRS=${PIVOT_PAIRS:-1}            # X<->Y pairs through English: N (those with most data), all, or de-fr,es-it
MAX_TRAIN_PAIRS=${MAX_TRAIN_PAIRS:-0}    # cap per bitext (0: all, ~20-55k for X-en)
MAX_VALID_PAIRS=${MAX_VALID_PAIRS:-100}  # cap per bitext; validation loss runs inside the training time
MAX_TEST_PAIRS=${MAX_TEST_PAIRS:-200}    # cap per bitext; decoding time grows with it
VOCAB=${VOCAB:-8000}                     # joint sentencepiece vocabulary, all languages
MODELS=${MODELS:-thor dense}             # any of thor, dense (--num-experts 1, plain label-smoothed CE),
                                         # switch, hash (gated baselines, GATED_EXPERTS experts; same sizes)
GATED_EXPERTS=${GATED_EXPERTS:-4}        # experts of switch and hash (the quality study's E)
TRAIN_MINUTES=${TRAIN_MINUTES:-28}       # wall-clock bound per model (fairseq --stop-time-hours)
MAX_UPDATE=${MAX_UPDATE:-1000}           # update bound per model (whichever comes first)
LAYERS=${LAYERS:-3}                      # encoder and decoder layers each
EMBED_DIM=${EMBED_DIM:-256}
FFN_DIM=${FFN_DIM:-512}                  # hidden width of each FFN (of each expert, for THOR)
HEADS=${HEADS:-4}
MAX_TOKENS=${MAX_TOKENS:-2048}           # tokens per batch
LR=${LR:-2e-3}                           # peak learning rate (inverse_sqrt schedule)
WARMUP=${WARMUP:-200}                    # --warmup-updates
NUM_EXPERTS=${NUM_EXPERTS:-2}
ALPHA=${ALPHA:-1.0}                      # --consistency-alpha
ROUTING=${ROUTING:-sentence}             # --expert-routing (training)
INFERENCE=${INFERENCE:-sentence}         # --inference-routing (decoding)
SAMPLING_TEMPERATURE=${SAMPLING_TEMPERATURE:-5}  # direction sampling, p ~ size^(1/T)
BEAM=${BEAM:-5}
SEED=${SEED:-1}                          # --seed of training and decoding (THOR draws its experts from it)
DECODE_JOBS=${DECODE_JOBS:-2}            # fairseq-generate processes at a time (one thread each)
LOG_INTERVAL=${LOG_INTERVAL:-50}
EXTRA_TRAIN_ARGS=${EXTRA_TRAIN_ARGS:-}
DEVICE_ARGS=$(python -c "import torch; print('' if torch.cuda.is_available() else '--cpu')")

step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
# our helpers' errors start with "error:"; anything else (a traceback) is shown in full
fail() { grep '^error:' "$1" >&2 || tail -20 "$1" >&2; exit 1; }
# a step's outputs are reused only when made with the same settings (stamp file in its folder)
fresh() { [ -s "$1/.settings" ] && [ "$(cat "$1/.settings")" = "$2" ]; }
model_args() {
  case $1 in
    thor)  echo "--num-experts $NUM_EXPERTS --expert-routing $ROUTING --inference-routing $INFERENCE
                 --criterion thor_consistency --consistency-alpha $ALPHA" ;;
    dense) echo "--num-experts 1 --criterion label_smoothed_cross_entropy" ;;
    switch|hash) echo "--num-experts $GATED_EXPERTS --expert-router $1 --capacity-factor 1.0
                 --criterion moe_label_smoothed_cross_entropy --moe-aux-loss-weight 0.01" ;;
  esac
}
for model in $MODELS; do
  [ -n "$(model_args "$model")" ] || {
    echo "error: MODELS='$MODELS': '$model' is not one of thor, dense, switch, hash" >&2; exit 1; }
done

RAW=$WORK/raw SPM=$WORK/spm BIN=$WORK/data-bin CKPT=$WORK/checkpoints OUT=$WORK/generate
HERE=examples/multilingual
mkdir -p "$WORK"
START=$SECONDS

step "1/6 building a many-to-many corpus from gettext catalogs in /usr/share/locale (en + $LANGS)"
RAW_SETTINGS="$LANGS|$EN_DIRECTIONS|$PIVOT_PAIRS|$MAX_TRAIN_PAIRS|$MAX_VALID_PAIRS|$MAX_TEST_PAIRS"
if ! fresh "$RAW" "$RAW_SETTINGS"; then
  rm -rf "$RAW" && mkdir -p "$RAW"
  # stderr holds fairseq's import warnings; shown only when the step fails
  python $HERE/prepare.py corpus --langs "$LANGS" --en-directions "$EN_DIRECTIONS" --pivot-pairs "$PIVOT_PAIRS" \
    --max-train "$MAX_TRAIN_PAIRS" --max-valid "$MAX_VALID_PAIRS" --max-test "$MAX_TEST_PAIRS" \
    --out "$RAW" 2> "$WORK/prepare.err" || fail "$WORK/prepare.err"
  echo "$RAW_SETTINGS" > "$RAW/.settings"
else
  echo "    reusing $RAW (made with the same settings)"
fi
read -r LANG_LIST LANG_PAIRS BITEXTS < <(python -c "import json; m = json.load(open('$RAW/corpus.json'))
print(','.join(m['langs']), ','.join(m['directions']), ' '.join(m['bitexts']))")
echo "    $(tr ',' '\n' <<< "$LANG_PAIRS" | wc -l) directions: $LANG_PAIRS"

step "2/6 training one joint sentencepiece model (vocab $VOCAB) for ${LANG_LIST//,/ } and encoding"
SPM_SETTINGS="$RAW_SETTINGS|$VOCAB"
if ! fresh "$SPM" "$SPM_SETTINGS"; then
  rm -rf "$SPM"
  python $HERE/prepare.py spm --raw "$RAW" --out "$SPM" --vocab-size "$VOCAB" \
    2> "$WORK/prepare.err" || fail "$WORK/prepare.err"
  echo "$SPM_SETTINGS" > "$SPM/.settings"
else
  echo "    reusing $SPM"
fi

step "3/6 binarizing each bitext into one data-bin with the joined dictionary (fairseq-preprocess)"
if ! fresh "$BIN" "$SPM_SETTINGS"; then
  rm -rf "$BIN"
  for bitext in $BITEXTS; do
    src=${bitext%-*} tgt=${bitext#*-}
    # --srcdict/--tgtdict: every language shares sentencepiece's vocabulary; each run writes
    # dict.SRC.txt and dict.TGT.txt, so the data-bin ends with dict.LANG.txt for every language
    fairseq-preprocess --source-lang "$src" --target-lang "$tgt" \
      --srcdict "$SPM/dict.txt" --tgtdict "$SPM/dict.txt" --workers 2 --destdir "$BIN" \
      --trainpref "$SPM/train.$bitext" --validpref "$SPM/valid.$bitext" --testpref "$SPM/test.$bitext" \
      > "$WORK/preprocess.log" 2>&1 || { tail -20 "$WORK/preprocess.log"; exit 1; }
    grep -E "/train\.$bitext\..*sents" "$WORK/preprocess.log" | sed 's/^.*\/\(train[^:]*\): /    \1: /'
  done
  echo "$SPM_SETTINGS" > "$BIN/.settings"
else
  echo "    reusing $BIN"
fi

# Flags shared by training and decoding: decoding must see the same --lang-pairs and --langs so that
# language tokens get the same ids (and the task checks that the data-bin holds every pair listed).
TASK_ARGS=(--user-dir fairseq_thor --task translation_multi_simple_epoch_thor
           --lang-pairs "$LANG_PAIRS" --langs "$LANG_LIST" --encoder-langtok src --decoder-langtok)

for model in $MODELS; do
  rm -rf "${CKPT:?}/$model"  # a rerun trains afresh instead of resuming a finished run
  case $model in
    thor) what="THOR (E=$NUM_EXPERTS, alpha=$ALPHA, $ROUTING routing)" ;;
    dense) what="the dense transformer (--num-experts 1, label-smoothed cross-entropy)" ;;
    *) what="$model (E=$GATED_EXPERTS, a gated baseline, capacity factor 1.0)" ;;
  esac
  step "4/6 training $what for at most $TRAIN_MINUTES min / $MAX_UPDATE updates"
  # the recipe of examples/demo, chosen there by measurement (pre-norm, lr 2e-3, warmup 200, no clip)
  # shellcheck disable=SC2046  # model_args is a list of flags
  fairseq-train "$BIN" "${TASK_ARGS[@]}" $DEVICE_ARGS $(model_args "$model") \
    --sampling-method temperature --sampling-temperature "$SAMPLING_TEMPERATURE" \
    --arch thor_transformer --share-all-embeddings \
    --encoder-layers "$LAYERS" --decoder-layers "$LAYERS" --encoder-embed-dim "$EMBED_DIM" \
    --decoder-embed-dim "$EMBED_DIM" --encoder-ffn-embed-dim "$FFN_DIM" --decoder-ffn-embed-dim "$FFN_DIM" \
    --encoder-attention-heads "$HEADS" --decoder-attention-heads "$HEADS" \
    --encoder-normalize-before --decoder-normalize-before \
    --label-smoothing 0.1 --dropout 0.1 --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 0.0 \
    --weight-decay 0.0001 --lr "$LR" --lr-scheduler inverse_sqrt --warmup-updates "$WARMUP" \
    --max-tokens "$MAX_TOKENS" --max-update "$MAX_UPDATE" \
    --stop-time-hours "$(python -c "print($TRAIN_MINUTES / 60)")" \
    --save-dir "$CKPT/$model" --no-epoch-checkpoints --log-format simple --log-interval "$LOG_INTERVAL" \
    --seed "$SEED" $EXTRA_TRAIN_ARGS \
    2>&1 | grep --line-buffered -E "train_inner|valid on|\| train \||done training|Error|error" \
         | sed -u 's/^.*| INFO | //'
  [ -s "$CKPT/$model/checkpoint_last.pt" ] || { echo "error: training $model wrote no checkpoint" >&2; exit 1; }
done

step "5/6 decoding every direction's test split with fairseq-generate (beam $BEAM, $DECODE_JOBS at a time)"
decode() {  # MODEL DIRECTION
  local log=$OUT/$1/$2.log t0=$SECONDS args=()
  [ "$1" = thor ] && args=(--inference-routing "$INFERENCE")
  # one thread per process: $DECODE_JOBS single-threaded decoders keep the cores busy and overlap
  # fairseq's start-up (~6 s each); torch's threads also slow to a crawl when cores are shared.
  # --max-len-a/-b bound an undertrained model's runaway hypotheses (and so decoding time).
  OMP_NUM_THREADS=1 fairseq-generate "$BIN" "${TASK_ARGS[@]}" $DEVICE_ARGS "${args[@]}" \
    --source-lang "${2%-*}" --target-lang "${2#*-}" --path "$CKPT/$1/checkpoint_last.pt" \
    --gen-subset test --beam "$BEAM" --max-tokens 8000 --max-len-a 1.5 --max-len-b 10 \
    --remove-bpe sentencepiece --seed "$SEED" > "$log" 2>&1 || { echo "error: decoding $2 with $1 failed:"; tail -20 "$log"; return 1; }
  printf '    %-6s %-6s %4d sentences decoded (%d s)\n' "$1" "$2" "$(grep -c '^H-' "$log")" $((SECONDS - t0))
}
rm -rf "$OUT"  # no hypotheses left from an earlier run
running=()
for model in $MODELS; do
  mkdir -p "$OUT/$model"
  for direction in ${LANG_PAIRS//,/ }; do
    decode "$model" "$direction" & running+=($!)
    if [ ${#running[@]} -ge "$DECODE_JOBS" ]; then  # wait for the oldest before starting another
      wait "${running[0]}" || { kill "${running[@]}" 2>/dev/null; exit 1; }
      running=("${running[@]:1}")
    fi
  done
done
for pid in "${running[@]}"; do wait "$pid" || { kill "${running[@]}" 2>/dev/null; exit 1; }; done

step "6/6 sacreBLEU per direction (detokenized test split; rows: directions, columns: models)"
# shellcheck disable=SC2086  # MODELS is a list
python $HERE/bleu_table.py --raw "$RAW" --generate "$OUT" --models $MODELS --out "$WORK/bleu" \
  2> "$WORK/bleu.err" || fail "$WORK/bleu.err"
echo "table: $WORK/bleu.md, $WORK/bleu.json; hypotheses: $OUT/MODEL/SRC-TGT.log; checkpoints: $CKPT"
echo "total: $(( (SECONDS - START) / 60 )) min $(( (SECONDS - START) % 60 )) s"
