"""Build a parallel corpus from gettext catalogs (``/usr/share/locale/<lang>/LC_MESSAGES/*.mo``).

Each catalog maps an English message (msgid) to a human translation (msgstr), so the machine's
installed software carries tens of thousands of real translation pairs per language. We read the
binary ``.mo`` files directly (the format is a header and two string tables), strip menu
accelerator marks, drop untranslated, empty and very long entries, and split by a hash of the
English side so that no English string lands in two splits (catalogs share many messages).

    python -m fairseq_thor.corpus.gettext_pairs --src de --tgt en --out data/raw
"""
import argparse
import glob
import hashlib
import os
import re
import struct
import sys
from typing import Dict, Iterator, List, Tuple

LOCALE_ROOT = "/usr/share/locale"
MAX_WORDS = 40
_ACCELERATOR = re.compile(r"(?<=\w)_(?=\w)|(?<![\w&])[_&](?=\w)|&(?=\w)")
_SPACES = re.compile(r"\s+")
_PLACEHOLDER_ONLY = re.compile(r"^[\W\d_%sdiuxfgcp\-\.]*$")


def read_mo(path: str) -> Iterator[Tuple[str, str]]:
    """Yield (msgid, msgstr) pairs of a binary gettext catalog; plural entries give the singular."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 28:
        return
    magic = struct.unpack("<I", data[:4])[0]
    order = "<" if magic == 0x950412DE else ">" if magic == 0xDE120495 else None
    if order is None:
        return
    count, orig_at, trans_at = struct.unpack(order + "3I", data[8:20])

    def string(table: int, i: int) -> str:
        length, offset = struct.unpack(order + "2I", data[table + 8 * i: table + 8 * i + 8])
        return data[offset: offset + length].decode("utf-8", errors="replace")

    for i in range(count):
        msgid, msgstr = string(orig_at, i), string(trans_at, i)
        if not msgid:
            continue  # the catalog header
        msgid = msgid.split("\x04")[-1]  # drop a msgctxt prefix
        yield msgid.split("\x00")[0], msgstr.split("\x00")[0]


def clean(text: str) -> str:
    """Remove accelerator marks (``_File``, ``&Open``) and collapse whitespace."""
    text = text.replace("\u200b", "")
    text = _ACCELERATOR.sub("", text)
    return _SPACES.sub(" ", text).strip()


def usable(src: str, tgt: str) -> bool:
    if not src or not tgt or src == tgt:
        return False
    if len(src.split()) > MAX_WORDS or len(tgt.split()) > MAX_WORDS:
        return False
    if "\ufffd" in src + tgt:
        return False
    return not (_PLACEHOLDER_ONLY.match(src) or _PLACEHOLDER_ONLY.match(tgt))


def collect_pairs(lang: str, locale_root: str = LOCALE_ROOT) -> Dict[str, str]:
    """English -> ``lang`` pairs from every catalog of ``lang``; first catalog (sorted) wins."""
    pairs: Dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(locale_root, lang, "LC_MESSAGES", "*.mo"))):
        for msgid, msgstr in read_mo(path):
            en, other = clean(msgid), clean(msgstr)
            if usable(en, other) and en not in pairs:
                pairs[en] = other
    return pairs


def split_of(english: str, valid_percent: float, test_percent: float) -> str:
    bucket = int(hashlib.md5(english.encode("utf-8")).hexdigest()[:8], 16) % 10000 / 100.0
    if bucket < test_percent:
        return "test"
    if bucket < test_percent + valid_percent:
        return "valid"
    return "train"


def build(src: str, tgt: str, out_dir: str, valid_percent=1.5, test_percent=1.5,
          max_train=None, locale_root=LOCALE_ROOT) -> Dict[str, int]:
    """Write ``{train,valid,test}.{src,tgt}`` under ``out_dir``; return sentences per split."""
    if "en" not in (src, tgt) or src == tgt:
        raise ValueError(f"gettext catalogs pair English with one other language; got {src}-{tgt}")
    other = tgt if src == "en" else src
    pairs = collect_pairs(other, locale_root)
    if not pairs:
        raise FileNotFoundError(
            f"no gettext catalogs with translations found under {locale_root}/{other}/LC_MESSAGES; "
            f"install translated packages (e.g. `apt-get install coreutils` with locales kept, or "
            f"the language packs) or pass --locale-root"
        )
    splits: Dict[str, List[Tuple[str, str]]] = {"train": [], "valid": [], "test": []}
    for en in sorted(pairs):
        splits[split_of(en, valid_percent, test_percent)].append((en, pairs[en]))
    if max_train is not None:
        splits["train"] = splits["train"][:max_train]
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in splits.items():
        for lang in (src, tgt):
            with open(os.path.join(out_dir, f"{name}.{lang}"), "w", encoding="utf-8") as f:
                for en, oth in rows:
                    f.write((en if lang == "en" else oth) + "\n")
    return {name: len(rows) for name, rows in splits.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="source language code, e.g. de")
    parser.add_argument("--tgt", required=True, help="target language code, e.g. en")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--valid-percent", type=float, default=1.5)
    parser.add_argument("--test-percent", type=float, default=1.5)
    parser.add_argument("--max-train", type=int, default=None, help="cap on training pairs")
    parser.add_argument("--locale-root", default=LOCALE_ROOT)
    args = parser.parse_args(argv)
    try:
        counts = build(args.src, args.tgt, args.out, args.valid_percent, args.test_percent,
                       args.max_train, args.locale_root)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(" ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
