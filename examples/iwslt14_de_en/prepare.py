"""IWSLT'14 German-English text, built the way fairseq's examples/translation/prepare-iwslt14.sh builds it.

    python prepare.py --orig ORIG/de-en --out TEXT [--merges 10000] [--workers 4]

ORIG is the folder the IWSLT'14 de-en tarball extracts to (``train.tags.de-en.{de,en}`` and the
``IWSLT14.TED*.de-en.{de,en}.xml`` dev/test files). The steps and their order follow fairseq's script,
so the splits are the ones IWSLT'14 de-en results are usually reported on (the THOR paper's Table 6
lists 7,283 validation sentences, which is this split):

1. train: drop the TED metadata lines (<url>, <talkid>, <keywords>), keep the text of <title> and
   <description> without the tags; Moses-tokenize; drop pairs outside 1..175 tokens or with a
   length ratio above 1.5 (Moses' clean-corpus-n); lowercase;
2. valid = every 23rd line of that, train = the rest;
3. test = the <seg> text of TED.dev2010, TEDX.dev2012, TED.tst2010, TED.tst2011, TED.tst2012 (in
   that order), with ’ written as ', tokenized and lowercased (not length-filtered);
4. one joint BPE (``--merges`` merges) learned on train de + en, applied to every split.

sacremoses and subword-nmt stand in for the Moses perl scripts and subword-nmt's command-line
scripts. Written to TEXT: ``{train,valid,test}.{de,en}`` (BPE: fairseq-preprocess's input),
``code`` (BPE merges), ``tok/`` (tokenized, lowercased, before BPE) and ``raw/test.{de,en}`` (the test
text before tokenization: the references for detokenized sacreBLEU).
"""
import argparse
import functools
import io
import os
import re
import sys
from multiprocessing import Pool
from typing import Callable, Dict, List, Sequence, Tuple

LANGS = ("de", "en")
PAIR = "de-en"
TEST_SETS = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
             "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012")
VALID_EVERY = 23
METADATA = ("<url>", "<talkid>", "<keywords>")  # whole lines dropped, as fairseq's `grep -v`
KEPT_TAGS = re.compile(r"</?(?:title|description)>")  # the tags go, their text stays
SEG_OPEN = re.compile(r'<seg id="[0-9]*">\s*')
SEG_CLOSE = re.compile(r"\s*</seg>\s*")


def read_lines(path: str) -> List[str]:
    # newline="\n": split on \n only, as grep and perl do; a stray \r inside a line must not
    # break one sentence into two and shift every later pair out of alignment
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


def write_lines(path: str, lines: Sequence[str]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)


def clean_train_tags(lines: Sequence[str]) -> List[str]:
    """train.tags.*: drop metadata lines, strip <title>/<description> and keep their text.

    Other lines (talk text, and any other tag line) pass through, as in fairseq's script: changing
    that would change the standard split.
    """
    return [KEPT_TAGS.sub("", line) for line in lines if not any(tag in line for tag in METADATA)]


def extract_segments(lines: Sequence[str]) -> List[str]:
    """dev/test xml: the text of each <seg id="N"> line; ’ becomes ' (fairseq does this for these sets only)."""
    return [SEG_CLOSE.sub("", SEG_OPEN.sub("", line)).replace("\u2019", "'").strip()
            for line in lines if "<seg id" in line]


_worker: Callable[[str], str] = str  # the per-process tokenizer or BPE; set by _start_*


def _start_tokenizer(lang: str) -> None:
    global _worker
    from sacremoses import MosesTokenizer

    # escape=True: &apos; &quot; &amp; ... as tokenizer.perl writes them (fairseq's data has them)
    _worker = functools.partial(MosesTokenizer(lang=lang).tokenize, return_str=True, escape=True)


def _start_bpe(codes: str) -> None:
    global _worker
    from subword_nmt.apply_bpe import BPE

    with open(codes, encoding="utf-8") as f:
        _worker = BPE(f).segment


def _call_worker(line: str) -> str:
    return _worker(line)


def _map(start: Callable, arg: str, lines: Sequence[str], workers: int) -> List[str]:
    """``_worker`` over lines, in order; ``workers`` > 1 uses that many processes."""
    if workers <= 1:
        start(arg)
        return [_call_worker(line) for line in lines]
    with Pool(workers, initializer=start, initargs=(arg,)) as pool:
        return pool.map(_call_worker, lines, chunksize=2000)


def tokenize(lines: Sequence[str], lang: str, workers: int = 1) -> List[str]:
    """Moses tokenization (tokenizer.perl -l LANG): blank lines stay blank."""
    return _map(_start_tokenizer, lang, lines, workers)


def lowercase(lines: Sequence[str]) -> List[str]:
    return [line.lower() for line in lines]  # Moses' lowercase.perl is perl's lc


def length_filter(src: Sequence[str], tgt: Sequence[str], min_len: int = 1, max_len: int = 175,
                  ratio: float = 1.5, max_word_chars: int = 1000) -> Tuple[List[str], List[str]]:
    """Moses' clean-corpus-n: keep pairs whose sides both have min..max tokens and whose token counts
    differ by at most ``ratio`` times; whitespace is normalised, as that script writes it. (It also
    deletes '|', which Moses' escaping has already turned into &#124;.)"""
    if len(src) != len(tgt):
        raise ValueError(f"the two sides differ in length: {len(src)} and {len(tgt)} lines")
    kept_src, kept_tgt = [], []
    for s, t in zip(src, tgt):
        s, t = " ".join(s.split()), " ".join(t.split())
        ns, nt = len(s.split()), len(t.split())
        if not (min_len <= ns <= max_len and min_len <= nt <= max_len):
            continue  # also drops empty lines: 0 tokens < min_len
        if ns / nt > ratio or nt / ns > ratio:
            continue
        if max(len(w) for w in (s + " " + t).split()) > max_word_chars:
            continue
        kept_src.append(s)
        kept_tgt.append(t)
    return kept_src, kept_tgt


def split_valid(lines: Sequence[str], every: int = VALID_EVERY) -> Tuple[List[str], List[str]]:
    """(train, valid): line numbers (from 1) divisible by ``every`` go to valid, as awk 'NR%23==0'."""
    valid = list(lines[every - 1::every])
    train = [line for i, line in enumerate(lines, start=1) if i % every]
    return train, valid


def learn_bpe(paths: Sequence[str], codes: str, merges: int) -> None:
    """One joint BPE on the concatenation of ``paths`` (learn_bpe.py -s MERGES)."""
    from subword_nmt.learn_bpe import learn_bpe as learn

    joint = io.StringIO("".join(line + "\n" for path in paths for line in read_lines(path)))
    with open(codes, "w", encoding="utf-8") as out:
        learn(joint, out, merges)


def apply_bpe(codes: str, lines: Sequence[str], workers: int = 1) -> List[str]:
    """apply_bpe.py -c CODES: words split into subwords joined by '@@ '."""
    return _map(_start_bpe, codes, lines, workers)


def _require(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"error: {path} not found: --orig must be the folder the IWSLT'14 "
                                f"de-en tarball extracts to (it holds train.tags.{PAIR}.de and the "
                                f"IWSLT14.TED*.xml files)")
    return path


def prepare(orig: str, out: str, merges: int = 10000, workers: int = 1) -> Dict[str, int]:
    """All the steps of the module docstring; returns the number of sentence pairs per split."""
    tok = {}
    for lang in LANGS:
        train = clean_train_tags(read_lines(_require(os.path.join(orig, f"train.tags.{PAIR}.{lang}"))))
        tok[lang] = tokenize(train, lang, workers)
    train_de, train_en = length_filter(tok["de"], tok["en"])
    splits: Dict[str, Dict[str, List[str]]] = {"train": {}, "valid": {}, "test": {}}
    for lang, lines in zip(LANGS, (train_de, train_en)):
        splits["train"][lang], splits["valid"][lang] = split_valid(lowercase(lines))
        raw = [seg for name in TEST_SETS
               for seg in extract_segments(read_lines(_require(os.path.join(orig, f"{name}.{PAIR}.{lang}.xml"))))]
        write_lines(os.path.join(out, "raw", f"test.{lang}"), raw)
        splits["test"][lang] = lowercase(tokenize(raw, lang, workers))
    for split, sides in splits.items():
        if len(sides["de"]) != len(sides["en"]):
            raise ValueError(f"error: {split}: {len(sides['de'])} German and {len(sides['en'])} English lines")
        for lang, lines in sides.items():
            write_lines(os.path.join(out, "tok", f"{split}.{lang}"), lines)

    codes = os.path.join(out, "code")
    learn_bpe([os.path.join(out, "tok", f"train.{lang}") for lang in LANGS], codes, merges)
    for split, sides in splits.items():
        for lang, lines in sides.items():
            write_lines(os.path.join(out, f"{split}.{lang}"), apply_bpe(codes, lines, workers))
    return {split: len(sides["de"]) for split, sides in splits.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orig", required=True, help="the extracted de-en folder of the IWSLT'14 tarball")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--merges", type=int, default=10000, help="joint BPE merges (fairseq's recipe: 10000)")
    parser.add_argument("--workers", type=int, default=1, help="processes for tokenization and BPE")
    args = parser.parse_args(argv)
    try:
        sizes = prepare(args.orig, args.out, args.merges, args.workers)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(str(e))
    print("    " + ", ".join(f"{split} {n} sentence pairs" for split, n in sizes.items()))


if __name__ == "__main__":
    main()
