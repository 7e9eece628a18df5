#!/usr/bin/env bash
# IWSLT'14 German-English for THOR, as fairseq's examples/translation/prepare-iwslt14.sh builds it:
# download + extract -> prepare.py (TED tag cleanup, Moses tokenization, length filter, lowercase,
# valid = every 23rd training line, test = five TED dev/test sets, joint BPE with 10k merges) ->
# fairseq-preprocess --joined-dictionary. Knobs are environment variables (README.md); paths are
# relative to the repository root. Needs the virtualenv's tools first on PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."

WORK=${WORK:-work/iwslt14_de_en}      # everything goes under here
SRC=${SRC:-de}                        # translation direction of the data-bin: de->en, or SRC=en TGT=de
TGT=${TGT:-en}
FROM_DIR=${FROM_DIR:-}                # an already-extracted de-en folder: no download
BPE_MERGES=${BPE_MERGES:-10000}
WORKERS=${WORKERS:-$(nproc)}
URL=${URL:-http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz}
TEXT=$WORK/text
DATA=${DATA:-$WORK/data-bin/iwslt14.tokenized.$SRC-$TGT}

case "$SRC-$TGT" in
  de-en|en-de) ;;
  *) echo "error: SRC=$SRC TGT=$TGT: IWSLT'14 here is de-en or en-de" >&2; exit 1 ;;
esac
step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
mkdir -p "$WORK"

if [ -n "$FROM_DIR" ]; then
  ORIG=$FROM_DIR
  step "1/3 using the extracted corpus in $ORIG (FROM_DIR)"
else
  ORIG=$WORK/orig/de-en
  step "1/3 downloading and extracting $URL"
  mkdir -p "$WORK/orig"
  if [ ! -s "$WORK/orig/de-en.tgz" ]; then
    # to a temporary name, so an interrupted download is not taken for the tarball next time
    { if command -v curl > /dev/null; then curl -fL --retry 3 -o "$WORK/orig/de-en.tgz.part" "$URL"
      else wget -O "$WORK/orig/de-en.tgz.part" "$URL"; fi; } \
      || { echo "error: download failed; fetch $URL by hand and set FROM_DIR to its extracted de-en folder" >&2; exit 1; }
    mv "$WORK/orig/de-en.tgz.part" "$WORK/orig/de-en.tgz"
  fi
  tar -xzf "$WORK/orig/de-en.tgz" -C "$WORK/orig"
fi

step "2/3 cleaning, tokenizing, splitting and learning/applying a joint BPE ($BPE_MERGES merges) into $TEXT"
python examples/iwslt14_de_en/prepare.py --orig "$ORIG" --out "$TEXT" --merges "$BPE_MERGES" --workers "$WORKERS"

step "3/3 fairseq-preprocess --joined-dictionary ($SRC->$TGT) into $DATA"
rm -rf "$DATA"  # fairseq-preprocess refuses to overwrite an existing dictionary
fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" --joined-dictionary \
  --trainpref "$TEXT/train" --validpref "$TEXT/valid" --testpref "$TEXT/test" \
  --destdir "$DATA" --workers "$WORKERS" > "$WORK/preprocess.log" 2>&1 \
  || { tail -20 "$WORK/preprocess.log"; exit 1; }
# fairseq-preprocess's summary: the dictionary size, then sentences and tokens of every file
{ grep -m1 "Dictionary:" "$WORK/preprocess.log"; grep "sents," "$WORK/preprocess.log"; } | sed 's/^.*fairseq_cli.preprocess[^[]*/    /'
echo "data-bin: $DATA   (reference text for sacreBLEU: $TEXT/raw/test.$TGT)"
