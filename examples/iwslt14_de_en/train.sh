#!/usr/bin/env bash
# THOR on IWSLT'14 (the paper's low-resource setting): E=2 experts in every other layer, the
# consistency-regularised loss with alpha=5, on fairseq's transformer_iwslt_de_en with fairseq's
# standard IWSLT hyper-parameters. Knobs are environment variables (README.md says which values are
# the paper's); DRY_RUN=1 prints the command instead of running it. Run prepare.sh first.
set -euo pipefail
cd "$(dirname "$0")/../.."

WORK=${WORK:-work/iwslt14_de_en}
SRC=${SRC:-de}
TGT=${TGT:-en}
DATA=${DATA:-$WORK/data-bin/iwslt14.tokenized.$SRC-$TGT}
SAVE_DIR=${SAVE_DIR:-$WORK/checkpoints/thor}
NUM_EXPERTS=${NUM_EXPERTS:-2}   # paper and reference code
ALPHA=${ALPHA:-5}               # paper and reference code
ROUTING=${ROUTING:-sentence}    # --expert-routing in training (the reference code: batch)
LR=${LR:-5e-4}                  # fairseq's IWSLT recipe; the reference code: 1e-3 with UPDATE_FREQ=8
MAX_TOKENS=${MAX_TOKENS:-4096}  # per GPU and pass
UPDATE_FREQ=${UPDATE_FREQ:-1}   # the paper's batch of ~32k tokens: 8 on one GPU
MAX_EPOCH=${MAX_EPOCH:-100}     # our choice (neither the paper nor fairseq's recipe states one)
SEED=${SEED:-1}
EXTRA_ARGS=${EXTRA_ARGS:-}      # e.g. --fp16 on a GPU

# --eval-bleu: validation BLEU (beam 5, detokenized with Moses) picks checkpoint_best.pt, as in
# fairseq's IWSLT example
cmd=(fairseq-train "$DATA" --user-dir fairseq_thor --task translation_thor
     --arch thor_transformer_iwslt_de_en --share-all-embeddings
     --num-experts "$NUM_EXPERTS" --expert-routing "$ROUTING" --inference-routing sentence
     --criterion thor_consistency --consistency-alpha "$ALPHA" --label-smoothing 0.1
     --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 0.0
     --lr "$LR" --lr-scheduler inverse_sqrt --warmup-updates 4000
     --dropout 0.3 --weight-decay 0.0001
     --max-tokens "$MAX_TOKENS" --update-freq "$UPDATE_FREQ" --max-epoch "$MAX_EPOCH"
     --eval-bleu --eval-bleu-args '{"beam": 5, "max_len_a": 1.2, "max_len_b": 10}'
     --eval-bleu-detok moses --eval-bleu-remove-bpe
     --best-checkpoint-metric bleu --maximize-best-checkpoint-metric
     --save-dir "$SAVE_DIR" --no-epoch-checkpoints --seed "$SEED")
# shellcheck disable=SC2206  # EXTRA_ARGS is a list of flags
cmd+=($EXTRA_ARGS)

if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
[ -d "$DATA" ] || { echo "error: no data-bin at $DATA: run examples/iwslt14_de_en/prepare.sh first" >&2; exit 1; }
exec "${cmd[@]}"
