#!/usr/bin/env bash
# make gpu-bundle: everything the bare GPU machine lacks, in one git-ignored folder (default
# work/gpu-bundle), for benchmarks/gpu/check.sh to install with no network.
#
# That machine (see README "GPU check") has Python 3.12 with torch (CUDA), numpy, cython,
# sentencepiece, sacrebleu, scikit-learn, torchaudio, pyyaml, regex, tqdm and pytest, but none of
# fairseq's own stack. The bundle holds:
#   wheels/  cp312 / pure-Python wheels of fairscale, hydra-core, omegaconf, antlr4, bitarray,
#            cffi, pycparser, at the versions installed in this checkout's .venv (what CI tests);
#   sdist/   fairseq-fixed's source (PyPI has no wheel): its C++/Cython extensions must be
#            compiled there, against that machine's torch;
#   demo/    make demo's corpus, already split, encoded and binarized (the GPU machine has no
#            gettext catalogs), laid out as examples/demo/run.sh's WORK folder so it skips steps 1-3;
#   MANIFEST.json  versions, sizes and sha256 of every file.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUNDLE=${BUNDLE:-work/gpu-bundle}
PYVER=${PYVER:-3.12}       # the GPU machine's Python
MAX_MIB=${MAX_MIB:-60}     # what may travel with the working tree is 64 MiB in all
PIP=".venv/bin/python -m pip"
[ -x .venv/bin/python ] || { echo "error: .venv is missing: run make venv first" >&2; exit 1; }

# the versions CI tests with
version() { $PIP show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
PURE="fairscale hydra-core omegaconf antlr4-python3-runtime"   # some only as sdists: built here
BINARY="bitarray cffi pycparser"                               # compiled: cp$PYVER wheels from PyPI
rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/wheels" "$BUNDLE/sdist"
pins() { for name in "$@"; do v=$(version "$name"); [ -n "$v" ] || { echo "error: $name is not in .venv" >&2; exit 1; }; echo "$name==$v"; done; }

echo "==> wheels for Python $PYVER: $(pins $BINARY | tr '\n' ' ')"
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$BUNDLE/wheels" $(pins $BINARY)
echo "==> pure-Python wheels: $(pins $PURE | tr '\n' ' ')"
$PIP wheel -q --no-deps -w "$BUNDLE/wheels" $(pins $PURE)
for whl in "$BUNDLE"/wheels/*.whl; do  # a wheel built here must not be tied to this Python
  case "$whl" in *-py3-none-any.whl|*-py2.py3-none-any.whl|*-cp${PYVER/./}-*) ;;
    *) echo "error: $whl would not install on Python $PYVER" >&2; exit 1 ;; esac
done

echo "==> fairseq-fixed source"
$PIP download -q --no-deps --no-build-isolation --no-binary :all: -d "$BUNDLE/sdist" \
  "fairseq-fixed==$(version fairseq-fixed)"

DEMO=$BUNDLE/demo
DEMO_CORPUS=${DEMO_CORPUS:-work/demo}  # a corpus make demo (or benchmarks/quality.py) built already
if [ -s "$DEMO_CORPUS/data-bin-8000/dict.en.txt" ] && [ -s "$DEMO_CORPUS/spm-8000/test.en" ]; then
  echo "==> make demo's corpus, from $DEMO_CORPUS"
  mkdir -p "$DEMO" && cp -r "$DEMO_CORPUS"/{raw,spm-8000,data-bin-8000} "$DEMO"/
else
  echo "==> make demo's corpus (examples/demo/run.sh with DATA_ONLY=1)"
  PATH=$PWD/.venv/bin:$PATH WORK=$DEMO DATA_ONLY=1 bash examples/demo/run.sh > "$BUNDLE/demo.log"
fi
# run.sh only checks that spm-8000/test.en exists; the rest of the encoded text is not needed
find "$DEMO/spm-8000" -type f ! -name 'spm.model' ! -name 'spm.vocab' ! -name 'test.en' -delete

.venv/bin/python - "$BUNDLE" "$PYVER" <<'EOF'
import hashlib, json, os, sys, time
bundle, pyver = sys.argv[1:]
files = {}
for root, _, names in os.walk(bundle):
    for name in sorted(names):
        path = os.path.join(root, name)
        with open(path, "rb") as f:
            files[os.path.relpath(path, bundle)] = {"bytes": os.path.getsize(path),
                                                    "sha256": hashlib.sha256(f.read()).hexdigest()}
manifest = {"python": pyver, "made": time.strftime("%Y-%m-%d %H:%M:%S"), "files": files}
with open(os.path.join(bundle, "MANIFEST.json"), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
EOF
MIB=$(du -sm "$BUNDLE" | cut -f1)
echo "==> $BUNDLE: ${MIB} MiB"
[ "$MIB" -le "$MAX_MIB" ] || { echo "error: the bundle is ${MIB} MiB, over ${MAX_MIB} MiB" >&2; exit 1; }
