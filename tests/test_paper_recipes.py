"""examples/iwslt14_de_en and examples/wmt16_en_de: the paper's data preparation, training and
decoding recipes, checked offline on small stand-in corpora written here (no download)."""
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from fairseq import options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IWSLT = os.path.join(REPO, "examples", "iwslt14_de_en")
WMT = os.path.join(REPO, "examples", "wmt16_en_de")


def load(path):
    """A recipe's module under a name of its own: tests/test_multilingual_recipe.py imports another
    ``prepare`` and both live in one pytest process."""
    name = "recipe_" + os.path.basename(os.path.dirname(path)) + "_" + os.path.basename(path)[:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare = load(os.path.join(IWSLT, "prepare.py"))
score = load(os.path.join(IWSLT, "score.py"))

DE = ["Das ist ein kleines Haus.", 'Ich habe "Hunger", sagte er.', "Wir gehen heute nach Hause!",
      "Die Katze schläft auf dem Sofa."]
EN = ["This is a small house.", 'I\'m "hungry", he said.', "We're going home today!",
      "The cat sleeps on the sofa."]
TALKS, LINES_PER_TALK = 3, 30
MARK = re.compile(r"\( \d+-\d+ \)|talk \d+|iwslt14\S+")  # what ties a German line to its English one


def read(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def write_iwslt_orig(folder):
    """A stand-in for the extracted IWSLT'14 de-en tarball. Every talk has TED metadata lines, a
    title and a description, 30 sentences ending in a "(talk-line)" mark, one pair whose lengths
    differ too much and one blank pair (both for the length filter); dev/test xml files have three
    <seg> lines each, between markup lines, with a ’ to normalise."""
    folder.mkdir(parents=True, exist_ok=True)
    for lang, sentences in (("de", DE), ("en", EN)):
        lines = []
        for t in range(TALKS):
            lines += [f"<url>http://www.ted.com/talks/{t}.html</url>", f"<keywords>talks, {lang}</keywords>",
                      f"<talkid>{t}</talkid>", f"<title>Talk {t}</title>",
                      f"<description>About talk {t}</description>"]
            lines += [f"{sentences[i % 4]} ({t}-{i})" for i in range(LINES_PER_TALK)]
            lines += ["eins zwei drei vier fünf sechs sieben acht" if lang == "de" else "one two", ""]
        (folder / f"train.tags.de-en.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for name in prepare.TEST_SETS:
            segs = [f'<seg id="{i}"> {sentences[i]} It\u2019s {name} </seg>' for i in range(3)]
            xml = ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>", f'<srcset setid="{name}">',
                   '<doc docid="1" genre="lectures">', "<talkid>1</talkid>", *segs, "</doc>", "</srcset>", "</mteval>"]
            (folder / f"{name}.de-en.{lang}.xml").write_text("\n".join(xml) + "\n", encoding="utf-8")


def run_script(script, **env):
    """A recipe script with the virtualenv's tools first on PATH; returns (exit code, output)."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               **{k: str(v) for k, v in env.items()})
    proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def dry_run(script, tool, **env):
    """The arguments of the ``tool`` command that ``script`` prints under DRY_RUN=1."""
    code, out = run_script(script, DRY_RUN=1, **env)
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith(tool + " "))
    return shlex.split(line)[1:]


# ---- IWSLT'14: the text processing of prepare.py --------------------------------------------------

def test_train_tag_cleanup_drops_metadata_lines_and_keeps_title_and_description_text():
    lines = ["<url>http://www.ted.com/talks/x.html</url>", "<keywords>talks, science</keywords>",
             "<talkid>42</talkid>", "<title>Al Gore: Climate</title>",
             "<description>TED Talk Subtitles</description>", "Danke schön.", "Ja, <i>wirklich</i>."]
    assert prepare.clean_train_tags(lines) == ["Al Gore: Climate", "TED Talk Subtitles", "Danke schön.",
                                               "Ja, <i>wirklich</i>."]


def test_segments_are_the_seg_text_with_curly_apostrophes_straightened():
    xml = ["<mteval>", '<doc docid="535" genre="lectures">', "<talkid>535</talkid>",
           '<seg id="1">  Das ist Anna\u2019s Haus.  </seg>', '  <seg id="22">Zweite Zeile.</seg>  ', "</doc>"]
    assert prepare.extract_segments(xml) == ["Das ist Anna's Haus.", "Zweite Zeile."]


def test_valid_is_exactly_every_23rd_line_and_train_the_rest():
    lines = [f"line {i}" for i in range(1, 101)]
    train, valid = prepare.split_valid(lines)
    assert valid == ["line 23", "line 46", "line 69", "line 92"]
    assert len(train) == 96 and not set(train) & set(valid)
    assert sorted(train + valid, key=lambda s: int(s.split()[1])) == lines  # nothing lost, order kept


def test_moses_tokenization_with_escaping_and_lowercasing():
    tokenized = prepare.tokenize(['Er sagt: "Nein", z.B. heute.', "   "], "de")
    assert tokenized == ["Er sagt : &quot; Nein &quot; , z.B. heute .", ""]  # blank stays blank
    assert prepare.lowercase(prepare.tokenize(["We're home!"], "en")) == ["we &apos;re home !"]


def test_length_filter_drops_empty_too_long_and_unbalanced_pairs():
    long_175, long_176 = " ".join(["w"] * 175), " ".join(["w"] * 176)
    src = ["ein  guter Satz ", "", "a", long_175, long_176, "a b c", "a b c d e", "x"]
    tgt = ["a good sentence", "b", "", long_175, long_175, "a b", "a b c", "x " + "y" * 1001]
    kept = prepare.length_filter(src, tgt)
    # kept: normal (whitespace normalised), 175 tokens, ratio exactly 1.5; dropped: an empty side,
    # 176 tokens, ratio 5/3 > 1.5, a word over 1000 characters
    assert kept == (["ein guter Satz", long_175, "a b c"], ["a good sentence", long_175, "a b"])
    with pytest.raises(ValueError, match="differ in length"):
        prepare.length_filter(["a"], [])


def test_bpe_learn_and_apply_round_trip(tmp_path):
    text = ["the lowest newest widest lower wider", "new low wide newer", "a brand new word : unseen"]
    prepare.write_lines(str(tmp_path / "train.tok"), text[:2] * 5)
    codes = str(tmp_path / "code")
    prepare.learn_bpe([str(tmp_path / "train.tok")], codes, merges=8)
    merges = [line for line in read(codes) if not line.startswith("#")]
    assert 0 < len(merges) <= 8
    encoded = prepare.apply_bpe(codes, text)
    assert any("@@ " in line for line in encoded)  # some words were split
    # fairseq's --remove-bpe ("@@ " removed) gives the tokenized text back
    assert [(line + " ").replace("@@ ", "").rstrip() for line in encoded] == text


@pytest.mark.cli  # runs prepare.sh in a subprocess
def test_whole_iwslt_pipeline_without_download_gives_a_data_bin(tmp_path):
    write_iwslt_orig(tmp_path / "orig")
    work = tmp_path / "work"
    code, out = run_script(os.path.join(IWSLT, "prepare.sh"), FROM_DIR=tmp_path / "orig", WORK=work,
                           BPE_MERGES=40, WORKERS=1)
    assert code == 0, out
    text = work / "text"
    kept = TALKS * (2 + LINES_PER_TALK)  # title + description + sentences; the bad pairs are gone
    sizes = {split: len(read(text / "tok" / f"{split}.de")) for split in ("train", "valid", "test")}
    assert sizes == {"train": kept - kept // 23, "valid": kept // 23, "test": 3 * len(prepare.TEST_SETS)}
    assert f"train {sizes['train']} sentence pairs, valid {sizes['valid']}" in out
    for split in sizes:  # the two sides stay aligned: the same mark (talk-line, talk, set) on every line
        de, en = read(text / "tok" / f"{split}.de"), read(text / "tok" / f"{split}.en")
        assert [MARK.search(line).group() for line in de] == [MARK.search(line).group() for line in en]
        assert all(line == line.lower() for line in de + en)
        # BPE applied, and removing it gives the tokenized text back
        assert [line.replace("@@ ", "") for line in read(text / f"{split}.de")] == de
    assert read(text / "tok" / "valid.en")[0].endswith("( 0-20 )")  # the 23rd kept line
    raw = read(text / "raw" / "test.en")
    assert raw[0] == "This is a small house. It's IWSLT14.TED.dev2010"
    assert [line.split()[-1] for line in raw[::3]] == list(prepare.TEST_SETS)  # fairseq's order
    data = work / "data-bin" / "iwslt14.tokenized.de-en"
    for split in sizes:
        for lang in ("de", "en"):
            for ext in ("bin", "idx"):
                assert (data / f"{split}.de-en.{lang}.{ext}").stat().st_size > 0
    assert read(data / "dict.de.txt") == read(data / "dict.en.txt")  # --joined-dictionary


@pytest.mark.cli  # runs prepare.sh in a subprocess
def test_iwslt_prepare_names_the_missing_file(tmp_path):
    write_iwslt_orig(tmp_path / "orig")
    (tmp_path / "orig" / "IWSLT14.TED.tst2012.de-en.en.xml").unlink()
    code, out = run_script(os.path.join(IWSLT, "prepare.sh"), FROM_DIR=tmp_path / "orig",
                           WORK=tmp_path / "work", BPE_MERGES=40, WORKERS=1)
    assert code != 0 and "IWSLT14.TED.tst2012.de-en.en.xml not found" in out


# ---- the commands: every flag must be one the plugin's fairseq parsers accept -----------------------

def parse(parser, argv):
    return options.parse_args_and_arch(parser, argv)


@pytest.mark.parametrize("recipe, expected", [
    (IWSLT, {"arch": "thor_transformer_iwslt_de_en", "lr": [5e-4], "max_tokens": 4096,
             "weight_decay": 0.0001, "eval_bleu": True, "fp16": False}),
    (WMT, {"arch": "thor_transformer_vaswani_wmt_en_de_big", "lr": [5e-4], "max_tokens": 3584,
           "warmup_init_lr": 1e-07, "weight_decay": 0.0, "fp16": True, "keep_last_epochs": 10}),
])
def test_train_sh_flags_are_accepted_by_the_plugin(recipe, expected, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # --user-dir fairseq_thor is relative to the repository root
    argv = dry_run(os.path.join(recipe, "train.sh"), "fairseq-train", WORK=tmp_path)
    args = parse(options.get_training_parser(), argv)
    common = {"task": "translation_thor", "criterion": "thor_consistency", "num_experts": 2,
              "consistency_alpha": 5.0, "label_smoothing": 0.1, "share_all_embeddings": True,
              "adam_betas": "(0.9, 0.98)", "lr_scheduler": "inverse_sqrt", "warmup_updates": 4000,
              "dropout": 0.3, "clip_norm": 0.0, "inference_routing": "sentence"}
    assert {k: getattr(args, k) for k in {**common, **expected}} == {**common, **expected}
    # the check can fail: a flag the plugin does not know is refused
    with pytest.raises(SystemExit):
        parse(options.get_training_parser(), argv + ["--consistency-beta", "3"])


def test_train_sh_knobs_reach_the_command(tmp_path):
    argv = dry_run(os.path.join(IWSLT, "train.sh"), "fairseq-train", WORK=tmp_path, NUM_EXPERTS=4,
                   ALPHA=1, UPDATE_FREQ=8, LR="1e-3", EXTRA_ARGS="--fp16 --max-update 10")
    flags = dict(zip(argv, argv[1:]))
    assert (flags["--num-experts"], flags["--consistency-alpha"], flags["--update-freq"], flags["--lr"],
            flags["--max-update"]) == ("4", "1", "8", "1e-3", "10")
    assert "--fp16" in argv and argv[0] == str(tmp_path / "data-bin" / "iwslt14.tokenized.de-en")


@pytest.mark.parametrize("recipe, beam, lenpen", [(IWSLT, 5, 1.0), (WMT, 4, 0.6)])
def test_generate_sh_flags_are_accepted_by_the_plugin(recipe, beam, lenpen, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    argv = dry_run(os.path.join(recipe, "generate.sh"), "fairseq-generate", WORK=tmp_path)
    args = parse(options.get_generation_parser(), argv)
    assert (args.task, args.inference_routing, args.beam, args.lenpen, args.post_process) == \
        ("translation_thor", "sentence", beam, lenpen, "subword_nmt")


def test_wmt_generate_decodes_the_average_of_the_last_ten_epochs(tmp_path):
    code, out = run_script(os.path.join(WMT, "generate.sh"), DRY_RUN=1, WORK=tmp_path)
    average, generate = out.strip().splitlines()
    assert "--num-epoch-checkpoints 10" in average
    assert f"--path {tmp_path}/checkpoints/thor/checkpoint.avg10.pt" in generate


# ---- scoring and checkpoint averaging -------------------------------------------------------------

def write_generate_log(path, pairs):
    """fairseq-generate's output for (hypothesis, tokenized reference) pairs, not in id order."""
    lines = []
    for i in reversed(range(len(pairs))):
        hyp, ref = pairs[i]
        lines += [f"S-{i}\tsource {i}", f"T-{i}\t{ref}", f"H-{i}\t-0.5\t{hyp}", f"D-{i}\t-0.5\t{hyp}"]
    path.write_text("\n".join(lines + ["Generate test with beam=5: BLEU4 = 0.00"]) + "\n", encoding="utf-8")


def test_score_detokenizes_in_sentence_order_and_compound_splits(tmp_path):
    refs = ["The Café-Liebhaber's cat sat on the mat today.", 'He said: "Yes" - twice, in 2021.',
            "A well-known state-of-the-art result was reported by them."]
    tok = [prepare.tokenize([r], "en")[0] for r in refs]
    gen = tmp_path / "gen.out"
    write_generate_log(gen, list(zip(tok, tok)))
    (tmp_path / "ref.en").write_text("\n".join(refs) + "\n", encoding="utf-8")
    result = score.score(str(gen), str(tmp_path / "ref.en"), "en")
    assert read(str(gen) + ".detok") == refs  # id order restored, Moses escapes undone
    assert result["sentences"] == 3 and result["sacrebleu"] == pytest.approx(100.0)
    assert score.compound_split("Café-Liebhaber - state-of-the-art") == \
        "Café ##AT##-##AT## Liebhaber - state ##AT##-##AT## of ##AT##-##AT## the ##AT##-##AT## art"
    # as the perl one-liner it copies: matches do not overlap, so the second hyphen of a-b-c stays
    assert score.compound_split("a-b-c") == "a ##AT##-##AT## b-c"

    # a hyphenated word half right scores higher once split into parts: the compound-split number
    hyp, ref = "we saw a well-known result in the old town hall today", "we saw a well-done result in the old town hall today"
    write_generate_log(gen, [(hyp, ref)])
    (tmp_path / "ref1.en").write_text(ref + "\n", encoding="utf-8")
    one = score.score(str(gen), str(tmp_path / "ref1.en"), "en")
    assert one["compound_split_bleu"] > one["tokenized_bleu"]


def test_score_refuses_when_sentences_are_missing(tmp_path):
    gen = tmp_path / "gen.out"
    write_generate_log(gen, [("a b c d", "a b c d")] * 2)
    (tmp_path / "ref.en").write_text("a b c d\na b c d\na b c d\n", encoding="utf-8")
    with pytest.raises(ValueError, match="2 translations but .* has 3 lines"):
        score.score(str(gen), str(tmp_path / "ref.en"), "en")


# ---- WMT'16: preparing an extracted wmt16_en_de.tar.gz --------------------------------------------

@pytest.mark.cli  # runs prepare.sh in a subprocess
def test_wmt_prepare_binarizes_an_extracted_tarball(tmp_path):
    text = tmp_path / "wmt16_en_de_bpe32k"
    text.mkdir()
    for prefix, n in (("train.tok.clean.bpe.32000", 40), ("newstest2013.tok.bpe.32000", 5),
                      ("newstest2014.tok.bpe.32000", 7)):
        for lang, words in (("en", "the house@@ s are small"), ("de", "die häus@@ er sind klein")):
            (text / f"{prefix}.{lang}").write_text(f"{words} {lang}\n" * n, encoding="utf-8")
    code, out = run_script(os.path.join(WMT, "prepare.sh"), FROM_DIR=text, WORK=tmp_path / "work", WORKERS=1)
    assert code == 0, out
    data = tmp_path / "work" / "data-bin" / "wmt16_en_de_bpe32k"
    for split in ("train", "valid", "test"):
        assert (data / f"{split}.en-de.de.bin").stat().st_size > 0
    assert read(data / "dict.en.txt") == read(data / "dict.de.txt")
    assert "newstest2014.tok.bpe.32000.en: 7 sents" in out

    (text / "newstest2014.tok.bpe.32000.de").unlink()
    code, out = run_script(os.path.join(WMT, "prepare.sh"), FROM_DIR=text, WORK=tmp_path / "work", WORKERS=1)
    assert code != 0 and "newstest2014.tok.bpe.32000.de is missing" in out
