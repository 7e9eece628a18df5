#!/usr/bin/env bash
# WMT'16 English-German for THOR, as fairseq's examples/scaling_nmt prepares it: Google's
# preprocessed wmt16_en_de.tar.gz (Moses-tokenized, joint BPE with 32k merges already applied;
# newstest2013 = valid, newstest2014 = test) -> fairseq-preprocess --joined-dictionary with 32768
# words per side. Knobs are environment variables (README.md); paths are relative to the repository
# root. Needs the virtualenv's tools first on PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."

WORK=${WORK:-work/wmt16_en_de}
SRC=${SRC:-en}
TGT=${TGT:-de}
FROM_DIR=${FROM_DIR:-}          # an already-extracted wmt16_en_de.tar.gz: no download
TARBALL=${TARBALL:-$WORK/orig/wmt16_en_de.tar.gz}
WORKERS=${WORKERS:-$(nproc)}
DATA=${DATA:-$WORK/data-bin/wmt16_${SRC}_${TGT}_bpe32k}
GDRIVE_ID=0B_bZck-ksdkpM25jRUN2X2UxMm8  # the file fairseq's scaling_nmt README links to
URL=${URL:-https://drive.usercontent.google.com/download?id=$GDRIVE_ID&export=download&confirm=t}
# file prefixes inside the tarball
TRAIN=train.tok.clean.bpe.32000 VALID=newstest2013.tok.bpe.32000 TEST=newstest2014.tok.bpe.32000

case "$SRC-$TGT" in
  en-de|de-en) ;;
  *) echo "error: SRC=$SRC TGT=$TGT: this corpus is en-de or de-en" >&2; exit 1 ;;
esac
step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
mkdir -p "$WORK"

if [ -n "$FROM_DIR" ]; then
  TEXT=$FROM_DIR
  step "1/2 using the extracted corpus in $TEXT (FROM_DIR)"
else
  TEXT=$WORK/wmt16_en_de_bpe32k
  step "1/2 downloading and extracting wmt16_en_de.tar.gz"
  if [ ! -s "$TARBALL" ]; then
    mkdir -p "$(dirname "$TARBALL")"
    # Google Drive answers large files with a confirmation page unless confirm=t; check that what
    # came back is a gzip file, not that page
    if ! { curl -fL --retry 3 -o "$TARBALL.part" "$URL" && gzip -t "$TARBALL.part" 2> /dev/null; }; then
      echo "error: could not download the tarball. Download it by hand from" \
           "https://drive.google.com/uc?export=download&id=$GDRIVE_ID (e.g. pip install gdown;" \
           "gdown $GDRIVE_ID) and put it at $TARBALL, or set FROM_DIR to its extracted folder" >&2
      exit 1
    fi
    mv "$TARBALL.part" "$TARBALL"
  fi
  mkdir -p "$TEXT"
  tar -xzf "$TARBALL" -C "$TEXT"
fi
for prefix in $TRAIN $VALID $TEST; do
  for lang in "$SRC" "$TGT"; do
    [ -s "$TEXT/$prefix.$lang" ] || { echo "error: $TEXT/$prefix.$lang is missing: is $TEXT the extracted wmt16_en_de.tar.gz?" >&2; exit 1; }
  done
done

step "2/2 fairseq-preprocess --joined-dictionary, 32768 words ($SRC->$TGT) into $DATA"
rm -rf "$DATA"  # fairseq-preprocess refuses to overwrite an existing dictionary
fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" --joined-dictionary \
  --nwordssrc 32768 --nwordstgt 32768 \
  --trainpref "$TEXT/$TRAIN" --validpref "$TEXT/$VALID" --testpref "$TEXT/$TEST" \
  --destdir "$DATA" --workers "$WORKERS" > "$WORK/preprocess.log" 2>&1 \
  || { tail -20 "$WORK/preprocess.log"; exit 1; }
# fairseq-preprocess's summary: the dictionary size, then sentences and tokens of every file
{ grep -m1 "Dictionary:" "$WORK/preprocess.log"; grep "sents," "$WORK/preprocess.log"; } | sed 's/^.*fairseq_cli.preprocess[^[]*/    /'
echo "data-bin: $DATA"
