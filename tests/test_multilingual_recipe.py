"""examples/multilingual: the many-to-many corpus built through English, and the recipe end to end.

The corpus tests use small stand-in catalogs (language -> {English message: translation}); every
line ends with its message number, so each written line maps back to its English message. The last
test runs the whole run.sh at toy size.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from fairseq_thor.corpus.gettext_pairs import split_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "examples", "multilingual")
sys.path.insert(0, RECIPE)

import bleu_table  # noqa: E402
import prepare  # noqa: E402
import seeds_table  # noqa: E402

SPLITS = ("train", "valid", "test")


def english(i):
    return f"the English text of message {i}"  # long enough for 4-gram BLEU


def catalogs(langs="de fr es", n=400, missing=None):
    """Stand-in catalogs; ``missing``: {lang: set of message numbers it has no translation for}."""
    missing = missing or {}
    return {lang: {english(i): f"{lang} text of message {i}" for i in range(n) if i not in missing.get(lang, ())}
            for lang in langs.split()}


def read(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def message_numbers(out, split, bitext):
    """The English message behind every line of a bitext's split, checked on both sides."""
    a, b = bitext.split("-")
    side_a, side_b = (read(out / f"{split}.{bitext}.{lang}") for lang in (a, b))
    numbers = [int(line.split()[-1]) for line in side_a]
    assert numbers == [int(line.split()[-1]) for line in side_b], "sides not aligned"
    return numbers


def test_pivot_pairs_the_two_translations_of_shared_english_messages():
    de = {"Open": "Öffnen", "Save": "Speichern", "Quit": "Beenden"}
    fr = {"Open": "Ouvrir", "Save": "Speichern", "Print": "Imprimer"}
    # "Save" has the same text on both sides (an untranslated copy), which is no translation pair
    assert prepare.pivot(de, fr) == {"Open": ("Öffnen", "Ouvrir")}


def test_no_english_message_lands_in_two_splits_in_any_direction(tmp_path):
    pairs = catalogs("de fr es", missing={"fr": set(range(0, 400, 3))})
    manifest = prepare.build_corpus(pairs, tmp_path, pivot_spec="de-fr,fr-es")
    split_by_message = {}
    for bitext in manifest["bitexts"]:
        for split in SPLITS:
            numbers = message_numbers(tmp_path, split, bitext)
            assert len(numbers) == len(set(numbers)) == manifest["bitexts"][bitext][split]
            for i in numbers:
                assert split_by_message.setdefault(i, split) == split, f"message {i} in two splits"
                assert split == split_of(english(i), 1.5, 1.5)  # gettext_pairs's own split
    assert {split for split in split_by_message.values()} == set(SPLITS)
    # X<->Y pairs exist only where English has both translations
    assert not any(i % 3 == 0 for split in SPLITS for i in message_numbers(tmp_path, split, "de-fr"))


def test_directions_files_and_manifest(tmp_path):
    manifest = prepare.build_corpus(catalogs("de fr es"), tmp_path, pivot_spec="fr-es")
    assert manifest["langs"] == ["en", "de", "fr", "es"]
    assert manifest["directions"] == ["de-en", "en-de", "fr-en", "en-fr", "es-en", "en-es", "fr-es", "es-fr"]
    assert list(manifest["bitexts"]) == ["de-en", "fr-en", "es-en", "fr-es"]  # one bitext per pair, read both ways
    expected = {"corpus.json"} | {f"{split}.{bitext}.{lang}" for bitext in manifest["bitexts"]
                                  for split in SPLITS for lang in bitext.split("-")}
    assert set(os.listdir(tmp_path)) == expected
    assert json.loads((tmp_path / "corpus.json").read_text()) == manifest
    assert read(tmp_path / "test.de-en.en")[0].startswith("the English text")  # the English side is English
    assert prepare.bitext_of("en-de", manifest["bitexts"]) == "de-en"
    assert prepare.bitext_of("es-fr", manifest["bitexts"]) == "fr-es"


@pytest.mark.parametrize("en_directions,expected", [
    ("to-en", ["de-en", "fr-en", "de-fr", "fr-de"]),
    ("from-en", ["en-de", "en-fr", "de-fr", "fr-de"]),
])
def test_one_way_english_directions(tmp_path, en_directions, expected):
    manifest = prepare.build_corpus(catalogs("de fr"), tmp_path, pivot_spec="1", en_directions=en_directions)
    assert manifest["directions"] == expected


def test_pivot_pairs_by_count_all_or_list():
    pairs = catalogs("de fr es", missing={"es": set(range(200))})  # es shares fewer messages
    assert prepare.choose_pivot_pairs(pairs, "1") == [("de", "fr")]
    assert prepare.choose_pivot_pairs(pairs, "0") == []
    assert prepare.choose_pivot_pairs(pairs, "all") == [("de", "fr"), ("de", "es"), ("fr", "es")]
    assert prepare.choose_pivot_pairs(pairs, "es-de, fr-es") == [("es", "de"), ("fr", "es")]
    with pytest.raises(ValueError, match="names 'it', which is not in the languages"):
        prepare.choose_pivot_pairs(pairs, "de-it")
    with pytest.raises(ValueError, match="two languages other than en"):
        prepare.choose_pivot_pairs(pairs, "de-en")


def test_caps_keep_a_hash_ordered_sample(tmp_path):
    manifest = prepare.build_corpus(catalogs("de", n=2000), tmp_path, pivot_spec="0",
                                    caps={"train": 50, "test": 5})
    assert manifest["bitexts"]["de-en"]["train"] == 50 and manifest["bitexts"]["de-en"]["test"] == 5
    numbers = message_numbers(tmp_path, "train", "de-en")
    # not the alphabetically first messages (numbers 0, 1, 10, 100, 1000, 1001, ...)
    assert len({str(i)[0] for i in numbers}) > 3


def test_a_language_without_catalogs_is_named_with_what_to_install(tmp_path):
    (tmp_path / "pt_BR" / "LC_MESSAGES").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as error:
        prepare.load_pairs(["pt"], str(tmp_path))
    message = str(error.value)
    assert "no translated gettext catalogs for 'pt'" in message and "install" in message
    assert "remove 'pt' from LANGS" in message and "catalogs exist for pt_BR" in message
    with pytest.raises(SystemExit, match="error: language 'pt-BR'"):
        prepare.main(["corpus", "--langs", "pt-BR", "--out", str(tmp_path / "out"), "--locale-root", str(tmp_path)])


def test_bleu_table_scores_every_direction_and_refuses_missing_hypotheses(tmp_path):
    raw, generate = tmp_path / "raw", tmp_path / "generate"
    manifest = prepare.build_corpus(catalogs("de fr", n=1000), raw, pivot_spec="0", en_directions="to-en")
    for model in ("thor", "dense"):
        (generate / model).mkdir(parents=True)
        for direction in manifest["directions"]:
            refs = read(raw / f"test.{direction}.en")
            hyps = refs if model == "thor" else ["nothing like it"] * len(refs)
            # fairseq-generate prints hypotheses in batch order, not sentence order
            lines = [f"H-{i}\t-0.5\t{hyp}" for i, hyp in reversed(list(enumerate(hyps)))]
            (generate / model / f"{direction}.log").write_text("S-0\tsource\n" + "\n".join(lines) + "\n")
    result = bleu_table.score(str(raw), str(generate), ["thor", "dense"])
    assert result["bleu"] == {"de-en": {"thor": 100.0, "dense": 0.0}, "fr-en": {"thor": 100.0, "dense": 0.0}}
    assert result["mean"] == {"thor": 100.0, "dense": 0.0}
    table = bleu_table.markdown(result).splitlines()
    assert table[0].split() == ["|", "direction", "|", "sentences", "|", "thor", "|", "dense", "|"]
    assert [row.split()[1] for row in table[2:]] == ["de-en", "fr-en", "mean"]

    log = generate / "dense" / "fr-en.log"
    log.write_text("\n".join(log.read_text().splitlines()[:-1]) + "\n")  # one hypothesis missing
    with pytest.raises(ValueError, match="dense fr-en: .* hypotheses for"):
        bleu_table.score(str(raw), str(generate), ["thor", "dense"])


def bleu_run(path, bleu: dict, sentences=200):
    """A bleu_table.py result for directions -> {model: BLEU}, written to ``path``."""
    models = list(next(iter(bleu.values())))
    mean = {m: round(sum(row[m] for row in bleu.values()) / len(bleu), 2) for m in models}
    path.write_text(json.dumps({"metric": "sacreBLEU x", "models": models, "bleu": bleu, "mean": mean,
                                "test_sentences": dict.fromkeys(bleu, sentences)}))
    return str(path)


def test_seeds_table_pools_seeds_and_compares_each_model_with_the_first(tmp_path, capsys):
    one = bleu_run(tmp_path / "1.json", {"de-en": {"thor": 10.0, "switch": 12.0},
                                         "en-de": {"thor": 20.0, "switch": 19.0}})
    two = bleu_run(tmp_path / "2.json", {"de-en": {"thor": 14.0, "switch": 12.0},
                                         "en-de": {"thor": 20.0, "switch": 21.0}})
    assert seeds_table.main([one, two, "--out", str(tmp_path / "seeds")]) == 0
    result = json.loads((tmp_path / "seeds.json").read_text())
    assert result["mean_by_seed"] == {"thor": [15.0, 17.0], "switch": [15.5, 16.5]}
    assert result["mean"]["thor"] == {"mean": 16.0, "std": 1.41, "min": 15.0, "max": 17.0, "n": 2}
    assert result["thor_minus"]["switch"]["by_seed"] == [-0.5, 0.5]
    assert result["thor_minus"]["switch"]["mean"] == 0.0
    assert result["bleu"] == {"de-en": {"thor": 12.0, "switch": 12.0}, "en-de": {"thor": 20.0, "switch": 20.0}}
    assert result["thor_leads_on"] == {"switch": 0}  # ties are not leads
    table = (tmp_path / "seeds.md").read_text()
    assert "| switch | 15.50, 16.50 | 16.00 ± 0.71 | -0.50, +0.50 | +0.00 ± 0.71 | 0 of 2 |" in table
    assert table in capsys.readouterr().out


def test_seeds_table_refuses_runs_of_another_corpus(tmp_path, capsys):
    one = bleu_run(tmp_path / "1.json", {"de-en": {"thor": 10.0, "dense": 12.0}})
    other = bleu_run(tmp_path / "2.json", {"de-en": {"thor": 11.0, "dense": 12.0}}, sentences=100)
    assert seeds_table.main([one, other, "--out", str(tmp_path / "seeds")]) == 1
    err = capsys.readouterr().err
    assert f"error: {other}: its test_sentences" in err and "only runs of the same corpus" in err
    (tmp_path / "3.json").write_text(json.dumps({"bleu": {}}))
    assert seeds_table.main([one, str(tmp_path / "3.json"), "--out", str(tmp_path / "seeds")]) == 1
    assert "3.json: not a bleu_table.py result (no mean, metric, models, test_sentences)" in capsys.readouterr().err
    assert seeds_table.main([one, one, "--out", str(tmp_path / "seeds")]) == 1
    assert f"{one} and {one} hold the same scores: the same run twice?" in capsys.readouterr().err
    assert not (tmp_path / "seeds.json").exists()


@pytest.mark.cli
def test_run_sh_end_to_end_at_toy_size(tmp_path):
    work = tmp_path / "work"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               WORK=str(work), LANGS="de fr", EN_DIRECTIONS="to-en", PIVOT_PAIRS="de-fr",
               MAX_TRAIN_PAIRS="200", MAX_VALID_PAIRS="8", MAX_TEST_PAIRS="8", VOCAB="400",
               LAYERS="1", EMBED_DIM="32", FFN_DIM="64", HEADS="2", MAX_UPDATE="3", TRAIN_MINUTES="1",
               BEAM="2", LOG_INTERVAL="1", MODELS="thor dense switch", GATED_EXPERTS="2", SEED="7",
               # toy models gain nothing from threads, and torch's threads crawl on busy cores
               OMP_NUM_THREADS="1")
    # MODELS: one of each of run.sh's three sets of flags (hash takes switch's, with its own router
    # name; test_routers trains and decodes every router through the CLI)
    proc = subprocess.run(["bash", os.path.join(RECIPE, "run.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for step in range(1, 7):
        assert f"] {step}/6 " in out
    directions = ["de-en", "fr-en", "de-fr", "fr-de"]
    result = json.loads((work / "bleu.json").read_text())
    assert result["models"] == ["thor", "dense", "switch"]
    assert list(result["bleu"]) == directions
    assert all(set(row) == {"thor", "dense", "switch"} for row in result["bleu"].values())
    assert result["test_sentences"] == dict.fromkeys(directions, 8)
    table = (work / "bleu.md").read_text()
    assert "| direction | sentences | thor | dense | switch |" in table
    assert "aux_loss=" in out  # the gated baselines trained with their load-balancing loss
    assert all(f"| {d} " in table for d in directions)
    assert "consistency=" in out  # THOR trained with its criterion
    # the joined dictionary under every language's name, as the multilingual task reads it
    assert {f"dict.{lang}.txt" for lang in ("en", "de", "fr")} <= set(os.listdir(work / "data-bin"))
    for model in ("thor", "dense"):  # SEED reached fairseq-train (and, by the same variable, generate)
        state = torch.load(work / "checkpoints" / model / "checkpoint_last.pt", weights_only=True)
        assert state["cfg"]["common"]["seed"] == 7
