#!/usr/bin/env bash
# The prepared GPU check: install from the bundle with no network, then run the steps of
# benchmarks/gpu/check_steps.py (each under its own time limit) and leave check.json + check.log
# in OUT.
#
#   on a GPU machine (repo root, bundle carried):  bash benchmarks/gpu/check.sh "$OUT"
#   CPU rehearsal (CI, toy sizes, CUDA steps skipped): bash benchmarks/gpu/check.sh OUT --rehearsal
#
# The device tool's call (one command, <= 10 minutes, the bundle named in carry):
#   bash benchmarks/gpu/check.sh "$OUT"           with carry ["work/gpu-bundle"], timeout_s 590
# Installing takes ~2-3 minutes there (fairseq's extensions are compiled against that machine's
# torch); the steps share what is left of BUDGET_S. Make the bundle first: make gpu-bundle.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: check.sh OUT [--rehearsal]}
MODE=${2:-gpu}
BUNDLE=${BUNDLE:-work/gpu-bundle}
BUDGET_S=${BUDGET_S:-560}  # the whole check, install included; under the device call's limit
START=$(date +%s)
mkdir -p "$OUT"
LOG=$OUT/check.log
export PYTHONUNBUFFERED=1

if [ "$MODE" = "--rehearsal" ]; then
  # CI has no CUDA and its own environment (.venv): nothing to install
  PY=${PY:-.venv/bin/python}
  INSTALL='{"name": "install", "status": "skipped", "reason": "rehearsal: uses this checkout'"'"'s environment", "seconds": 0}'
  echo "rehearsal: no install; Python $($PY -V 2>&1)" > "$LOG"
else
  PY=${PY:-python3}
  [ -f "$BUNDLE/MANIFEST.json" ] || { echo "error: no bundle at $BUNDLE: run make gpu-bundle here and carry it" >&2; exit 2; }
  {
    echo "==> install from $BUNDLE ($(date +%H:%M:%S))"
    # fairseq-fixed's setup.py compiles its CUDA extensions whenever CUDA_HOME is set: not needed
    # here and minutes of nvcc, so it is unset for the build
    $PY -m pip install -q --no-index --no-deps --no-build-isolation "$BUNDLE"/wheels/*.whl &&
    env -u CUDA_HOME MAX_JOBS=16 timeout 300 $PY -m pip install -q --no-index --no-deps \
      --no-build-isolation "$BUNDLE"/sdist/fairseq_fixed-*.tar.gz &&
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . &&
    $PY -c "import fairseq, fairscale, hydra, fairseq_thor; print('installed fairseq', fairseq.__version__)"
  } > "$LOG" 2>&1
  RC=$?
  SECONDS_USED=$(( $(date +%s) - START ))
  if [ $RC -eq 0 ]; then STATUS=ok; else STATUS=failed; fi
  INSTALL="{\"name\": \"install\", \"status\": \"$STATUS\", \"seconds\": $SECONDS_USED}"
  tail -3 "$LOG"
  if [ $RC -ne 0 ]; then
    echo "{\"steps\": [$INSTALL]}" > "$OUT/check.json"
    echo "install failed (rc $RC); see $LOG"; tail -30 "$LOG"; exit 1
  fi
fi
# the steps call console scripts (fairseq-train, ...): they live beside the interpreter
export PATH="$(dirname "$($PY -c 'import sys; print(sys.executable)')"):$PATH"

LEFT=$(( BUDGET_S - ($(date +%s) - START) ))
exec $PY benchmarks/gpu/check_steps.py --out "$OUT" --budget-s "$LEFT" --install-json "$INSTALL" \
  --bundle "$BUNDLE" $([ "$MODE" = "--rehearsal" ] && echo --rehearsal)
