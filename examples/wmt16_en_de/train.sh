#!/usr/bin/env bash
# THOR on WMT'16 En-De (the paper's rich-resource setting) with fairseq's examples/scaling_nmt
# recipe: Transformer-big, shared embeddings, fp16, and THOR's flags (E experts in every other
# layer, the consistency-regularised loss). Knobs are environment variables (README.md says which
# values are confirmed from the paper and which are not); DRY_RUN=1 prints the command instead of
# running it. Run prepare.sh first; multi-GPU: fairseq uses every visible GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."

WORK=${WORK:-work/wmt16_en_de}
SRC=${SRC:-en}
TGT=${TGT:-de}
DATA=${DATA:-$WORK/data-bin/wmt16_${SRC}_${TGT}_bpe32k}
SAVE_DIR=${SAVE_DIR:-$WORK/checkpoints/thor}
ARCH=${ARCH:-thor_transformer_vaswani_wmt_en_de_big}  # scaling_nmt's; thor_transformer_wmt_en_de: base size
NUM_EXPERTS=${NUM_EXPERTS:-2}
ALPHA=${ALPHA:-5}               # the paper's alpha (stated for its translation experiments)
ROUTING=${ROUTING:-sentence}    # --expert-routing in training (the reference code: batch)
LR=${LR:-5e-4}                  # scaling_nmt; with big batches (UPDATE_FREQ=16 on 8 GPUs) it advises 1e-3
MAX_TOKENS=${MAX_TOKENS:-3584}  # per GPU and pass
UPDATE_FREQ=${UPDATE_FREQ:-1}
MAX_EPOCH=${MAX_EPOCH:-50}      # our choice: fairseq's recipe states none
KEEP_EPOCHS=${KEEP_EPOCHS:-10}  # generate.sh averages the last 10
FP16=${FP16:-1}                 # scaling_nmt trains in fp16 (needs a GPU); FP16=0 for fp32
SEED=${SEED:-1}
EXTRA_ARGS=${EXTRA_ARGS:-}

cmd=(fairseq-train "$DATA" --user-dir fairseq_thor --task translation_thor
     --arch "$ARCH" --share-all-embeddings
     --num-experts "$NUM_EXPERTS" --expert-routing "$ROUTING" --inference-routing sentence
     --criterion thor_consistency --consistency-alpha "$ALPHA" --label-smoothing 0.1
     --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 0.0
     --lr "$LR" --lr-scheduler inverse_sqrt --warmup-updates 4000 --warmup-init-lr 1e-07
     --dropout 0.3 --weight-decay 0.0
     --max-tokens "$MAX_TOKENS" --update-freq "$UPDATE_FREQ" --max-epoch "$MAX_EPOCH"
     --save-dir "$SAVE_DIR" --keep-last-epochs "$KEEP_EPOCHS" --seed "$SEED")
[ "$FP16" = 1 ] && cmd+=(--fp16)
# shellcheck disable=SC2206  # EXTRA_ARGS is a list of flags
cmd+=($EXTRA_ARGS)

if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
[ -d "$DATA" ] || { echo "error: no data-bin at $DATA: run examples/wmt16_en_de/prepare.sh first" >&2; exit 1; }
exec "${cmd[@]}"
