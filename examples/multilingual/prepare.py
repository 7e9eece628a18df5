"""Many-to-many corpus from gettext catalogs, and a joint sentencepiece model for it.

    python prepare.py corpus --langs de,fr,es --pivot-pairs 2 --out RAW
    python prepare.py spm --raw RAW --out SPM --vocab-size 8000

Every catalog maps an English message to its translation, so English is the pivot: each language
X gives X<->en pairs, and an English message translated into both X and Y gives an X<->Y pair (two
human translations of the same message). Every pair is split by a hash of its *English* message
(gettext_pairs.split_of), so a message is in one split for every direction: a test sentence of
de->fr is never seen in training through de->en or en->fr.

Files follow fairseq's multilingual layout, one bitext per unordered pair, read in both directions:
``{split}.{a}-{b}.{a}`` / ``{split}.{a}-{b}.{b}``, plus ``corpus.json`` (languages, bitexts with
their sizes, and the trained directions in ``--lang-pairs`` order).
"""
import argparse
import hashlib
import itertools
import json
import os
import sys
from typing import Dict, List, Tuple

from fairseq_thor.corpus.gettext_pairs import LOCALE_ROOT, collect_pairs, split_of, usable

SPLITS = ("train", "valid", "test")
Row = Tuple[str, str, str]  # (English message, side a, side b)


def pivot(pairs_a: Dict[str, str], pairs_b: Dict[str, str]) -> Dict[str, Tuple[str, str]]:
    """a<->b pairs through English: the two translations of every message both languages have."""
    return {en: (pairs_a[en], pairs_b[en]) for en in pairs_a.keys() & pairs_b.keys()
            if usable(pairs_a[en], pairs_b[en])}


def choose_pivot_pairs(pairs: Dict[str, Dict[str, str]], spec: str) -> List[Tuple[str, str]]:
    """``spec``: a number N (the N pairs with the most shared messages), ``all``, or ``de-fr,es-it``."""
    langs = [lang for lang in pairs if lang != "en"]
    candidates = list(itertools.combinations(langs, 2))
    spec = spec.strip()
    if spec == "all":
        return candidates
    if spec.isdigit():
        by_size = sorted(candidates, key=lambda ab: -len(pairs[ab[0]].keys() & pairs[ab[1]].keys()))
        return sorted(by_size[:int(spec)], key=candidates.index)  # keep LANGS order for readability
    chosen = []
    for item in spec.replace(",", " ").split():
        a, _, b = item.partition("-")
        if not a or not b or a == b or "en" in (a, b):
            raise ValueError(f"pivot pair '{item}' is not of the form X-Y with two languages other than en")
        for lang in (a, b):
            if lang not in langs:
                raise ValueError(f"pivot pair '{item}' names '{lang}', which is not in the languages "
                                 f"({', '.join(langs)}); add it to LANGS")
        chosen.append((a, b))
    return chosen


def split_rows(rows: Dict[str, Tuple[str, str]], caps: Dict[str, int],
               valid_percent: float, test_percent: float) -> Dict[str, List[Row]]:
    """Split by the English message; ``caps`` keeps a hash-ordered (so unbiased) prefix of a split."""
    splits: Dict[str, List[Row]] = {name: [] for name in SPLITS}
    # hash order, not alphabetical: a capped split would otherwise hold only messages that start
    # with digits, "%" or "A"
    for en in sorted(rows, key=lambda en: hashlib.md5(en.encode("utf-8")).hexdigest()):
        splits[split_of(en, valid_percent, test_percent)].append((en, *rows[en]))
    for name, cap in caps.items():
        if cap:
            splits[name] = splits[name][:cap]
    return splits


def directions(langs: List[str], pivot_pairs: List[Tuple[str, str]], en_directions: str) -> List[str]:
    """The trained directions in ``--lang-pairs`` order: X->en and/or en->X, then both ways of X-Y."""
    chosen = []
    for lang in langs:
        if en_directions in ("both", "to-en"):
            chosen.append(f"{lang}-en")
        if en_directions in ("both", "from-en"):
            chosen.append(f"en-{lang}")
    for a, b in pivot_pairs:
        chosen += [f"{a}-{b}", f"{b}-{a}"]
    return chosen


def build_corpus(pairs: Dict[str, Dict[str, str]], out_dir: str, pivot_spec="2", en_directions="both",
                 caps=None, valid_percent=1.5, test_percent=1.5) -> dict:
    """Write every bitext under ``out_dir`` and return the manifest (also saved as corpus.json).

    ``pairs``: language -> {English message: translation}, as collect_pairs returns.
    """
    if en_directions not in ("both", "to-en", "from-en"):
        raise ValueError(f"en directions must be both, to-en or from-en; got '{en_directions}'")
    langs = list(pairs)
    pivot_pairs = choose_pivot_pairs(pairs, pivot_spec)
    # bitext name -> {English message: (side a, side b)}
    bitexts = {f"{lang}-en": {en: (other, en) for en, other in pairs[lang].items()} for lang in langs}
    for a, b in pivot_pairs:
        bitexts[f"{a}-{b}"] = pivot(pairs[a], pairs[b])

    os.makedirs(out_dir, exist_ok=True)
    sizes = {}
    for name, rows in bitexts.items():
        a, b = name.split("-")
        splits = split_rows(rows, caps or {}, valid_percent, test_percent)
        if not splits["train"] or not splits["test"]:
            raise ValueError(f"{name}: {len(rows)} pairs leave an empty train or test split; "
                             f"choose another pair or larger caps")
        for split, lines in splits.items():
            for side, lang in ((1, a), (2, b)):
                with open(os.path.join(out_dir, f"{split}.{name}.{lang}"), "w", encoding="utf-8") as f:
                    f.writelines(row[side] + "\n" for row in lines)
        sizes[name] = {split: len(lines) for split, lines in splits.items()}
    manifest = {"langs": ["en", *langs], "bitexts": sizes,
                "directions": directions(langs, pivot_pairs, en_directions)}
    with open(os.path.join(out_dir, "corpus.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def bitext_of(direction: str, bitexts) -> str:
    """The bitext a direction is read from (fairseq reads en-de from the de-en files)."""
    src, tgt = direction.split("-")
    return f"{src}-{tgt}" if f"{src}-{tgt}" in bitexts else f"{tgt}-{src}"


def load_pairs(langs: List[str], locale_root: str) -> Dict[str, Dict[str, str]]:
    pairs = {}
    for lang in langs:
        if "-" in lang or lang == "en":
            raise ValueError(f"language '{lang}': give gettext codes other than en, with '_' not '-' "
                             f"(pt_BR, zh_CN), as under {locale_root}")
        pairs[lang] = collect_pairs(lang, locale_root)
        if not pairs[lang]:
            near = sorted(d for d in os.listdir(locale_root) if d.split("_")[0] == lang.split("_")[0]
                          and os.path.isdir(os.path.join(locale_root, d, "LC_MESSAGES"))) \
                if os.path.isdir(locale_root) else []
            raise FileNotFoundError(
                f"no translated gettext catalogs for '{lang}' under {locale_root}/{lang}/LC_MESSAGES. "
                f"Install software translated into it with its locale files kept (Debian/Ubuntu: drop "
                f"the path-exclude for /usr/share/locale in /etc/dpkg/dpkg.cfg.d/ and reinstall, or "
                f"install language-pack-{lang.split('_')[0]}), or remove '{lang}' from LANGS"
                + (f"; catalogs exist for {', '.join(near)}" if near else ""))
    return pairs


def train_spm(raw: str, out: str, vocab_size: int, max_sentences: int, threads: int):
    """One sentencepiece model for all languages, trained on each language's training sentences once.

    English sits in every X-en bitext; counting it once per bitext would give it half the
    vocabulary. The joined fairseq dictionary is the sentencepiece vocabulary, and every
    bitext/split/language file is encoded.
    """
    import sentencepiece as spm

    with open(os.path.join(raw, "corpus.json")) as f:
        manifest = json.load(f)
    os.makedirs(out, exist_ok=True)
    sentences: Dict[str, set] = {lang: set() for lang in manifest["langs"]}
    for name in manifest["bitexts"]:
        for lang in name.split("-"):
            with open(os.path.join(raw, f"train.{name}.{lang}"), encoding="utf-8") as f:
                sentences[lang].update(line.rstrip("\n") for line in f)
    text = os.path.join(out, "spm_input.txt")
    with open(text, "w", encoding="utf-8") as f:
        for lang in manifest["langs"]:
            f.writelines(s + "\n" for s in sorted(sentences[lang]))
    prefix = os.path.join(out, "spm")
    spm.SentencePieceTrainer.train(
        input=text, model_prefix=prefix, vocab_size=vocab_size, model_type="unigram",
        # a few rare characters (CJK, symbols) stay <unk> instead of taking vocabulary slots
        character_coverage=0.9995, input_sentence_size=max_sentences, shuffle_input_sentence=True,
        num_threads=threads, bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2,
    )  # fairseq's dictionary adds <s> <pad> </s> <unk> itself: only sentencepiece's <unk> remains
    os.remove(text)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    with open(os.path.join(out, "dict.txt"), "w", encoding="utf-8") as f:
        # fairseq's "symbol count" format; the count is unused with --srcdict/--tgtdict
        f.writelines(f"{sp.id_to_piece(i)} 1\n" for i in range(1, sp.get_piece_size()))
    for name in manifest["bitexts"]:
        for split in SPLITS:
            for lang in name.split("-"):
                with open(os.path.join(raw, f"{split}.{name}.{lang}"), encoding="utf-8") as f:
                    lines = [line.rstrip("\n") for line in f]
                pieces = sp.encode(lines, out_type=str, num_threads=threads)
                with open(os.path.join(out, f"{split}.{name}.{lang}"), "w", encoding="utf-8") as f:
                    f.writelines(" ".join(p) + "\n" for p in pieces)
    print(f"    sentencepiece model {prefix}.model: {vocab_size} pieces from "
          + ", ".join(f"{len(sentences[lang])} {lang}" for lang in manifest["langs"]) + " sentences")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corpus", help="write the bitexts and corpus.json")
    c.add_argument("--langs", required=True, help="languages besides English, e.g. de,fr,es")
    c.add_argument("--pivot-pairs", default="2",
                   help="X<->Y pairs through English: a number N (the N with most data), 'all', "
                        "or a list such as de-fr,es-it; 0 for none")
    c.add_argument("--en-directions", default="both", choices=["both", "to-en", "from-en"])
    c.add_argument("--out", required=True)
    for split in SPLITS:
        c.add_argument(f"--max-{split}", type=int, default=0, help=f"cap on {split} pairs per bitext (0: none)")
    c.add_argument("--valid-percent", type=float, default=1.5)
    c.add_argument("--test-percent", type=float, default=1.5)
    c.add_argument("--locale-root", default=LOCALE_ROOT)
    s = sub.add_parser("spm", help="train the joint sentencepiece model, encode, write dict.txt")
    s.add_argument("--raw", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--vocab-size", type=int, default=8000)
    s.add_argument("--max-sentences", type=int, default=300000, help="sentences sampled to train it")
    s.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    try:
        if args.command == "spm":
            return train_spm(args.raw, args.out, args.vocab_size, args.max_sentences, args.threads)
        pairs = load_pairs(args.langs.replace(",", " ").split(), args.locale_root)
        caps = {split: getattr(args, f"max_{split}") for split in SPLITS}
        manifest = build_corpus(pairs, args.out, args.pivot_pairs, args.en_directions, caps,
                                args.valid_percent, args.test_percent)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    for name, sizes in manifest["bitexts"].items():
        print(f"    {name:8s} " + "  ".join(f"{split} {n:6d}" for split, n in sizes.items()))


if __name__ == "__main__":
    main()
