"""``--task translation_multi_simple_epoch_thor``: one THOR model for several directions.

A toy three-language corpus (xx, yy, zz spell the same words in three alphabets; yy reverses the
word order) is binarized the way fairseq's multilingual examples do it: one joined dictionary,
``fairseq-preprocess`` once per pair into one data-bin, ``dict.LANG.txt`` per language.
"""
import os
import random
import re
from functools import partial

import pytest
import torch
from fairseq import metrics, options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.tasks.translation_multi_simple_epoch import TranslationMultiSimpleEpochTask

from test_cli import REPO, hypotheses, run

NUM_EVAL = 13  # not a multiple of 8: fairseq's default batch multiple would drop sentences
PAIRS = "xx-yy,zz-yy,yy-xx"  # yy-xx is read from the xx-yy files, as fairseq allows
LANGTOKS = ["--encoder-langtok", "src", "--decoder-langtok"]
MODEL = ["--arch", "thor_transformer", "--encoder-layers", "1", "--decoder-layers", "2",
         "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
         "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
         "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--num-experts", "2",
         "--share-all-embeddings"]
TASK = ["--user-dir", os.path.join(REPO, "fairseq_thor"), "--task", "translation_multi_simple_epoch_thor",
        "--lang-pairs", PAIRS, *LANGTOKS]
pytestmark = pytest.mark.cli  # every test needs the fairseq-preprocess'ed data


def spell(lang, words):
    return " ".join(f"{lang[0]}{w}" for w in (reversed(words) if lang == "yy" else words))


def write_corpus(raw, rng):
    """Files SPLIT.SRC-TGT.LANG for the binarized pairs xx-yy and zz-yy, and one joined dictionary."""
    for src, tgt in [("xx", "yy"), ("zz", "yy")]:
        for split, n in {"train": 200, "valid": NUM_EVAL, "test": NUM_EVAL}.items():
            lines = [[rng.randrange(20) for _ in range(rng.randint(3, 8))] for _ in range(n)]
            for lang in (src, tgt):
                with open(raw / f"{split}.{src}-{tgt}.{lang}", "w") as f:
                    f.writelines(spell(lang, words) + "\n" for words in lines)
    with open(raw / "dict.txt", "w") as f:  # fairseq's dictionary format: "symbol count"
        f.writelines(f"{lang[0]}{w} 1\n" for lang in ("xx", "yy", "zz") for w in range(20))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilingual")
    raw, data = root / "raw", root / "data-bin"
    raw.mkdir()
    write_corpus(raw, random.Random(0))
    for src, tgt in [("xx", "yy"), ("zz", "yy")]:
        run("fairseq-preprocess", "--source-lang", src, "--target-lang", tgt,
            "--srcdict", raw / "dict.txt", "--tgtdict", raw / "dict.txt",
            *[arg for split in ("train", "valid", "test") for arg in (f"--{split}pref", raw / f"{split}.{src}-{tgt}")],
            "--destdir", data, "--workers", "1")
    return data


def parse_config(data, *extra):
    """The configuration exactly as fairseq-train builds it."""
    parser = options.get_training_parser()
    return convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, [str(data), *MODEL, *TASK, *extra]))


def parse_task_args(data, *extra):
    return parse_config(data, *extra).task


def eval_batches(task, split, get_batch_iterator=None):
    task.load_dataset(split)
    get_batch_iterator = get_batch_iterator or task.get_batch_iterator
    return list(get_batch_iterator(dataset=task.dataset(split), max_tokens=200, seed=1,
                                   required_batch_size_multiple=8).next_epoch_itr(shuffle=False))


@pytest.mark.parametrize("split", ["valid", "test"])
def test_batches_cover_every_sentence_with_language_tokens_where_configured(data, split):
    task = tasks.setup_task(parse_task_args(data))
    d = task.source_dictionary
    seen = []
    for batch in eval_batches(task, split):
        for row in range(len(batch["id"])):
            pair = task.lang_pairs[batch["lang_pair"][row]]
            src, tgt = pair.split("-")
            source = [d[t] for t in batch["net_input"]["src_tokens"][row] if t != d.pad()]
            target = [d[t] for t in batch["target"][row] if t != d.pad()]
            # --encoder-langtok src: the source starts with its language; --decoder-langtok: the
            # target starts with its own (and the decoder input is eos, then that token)
            assert source[0] == f"__{src}__" and source[-1] == "</s>"
            assert {w[0] for w in source[1:-1]} == {src[0]}
            assert target[0] == f"__{tgt}__" and {w[0] for w in target[1:-1]} == {tgt[0]}
            assert d[batch["net_input"]["prev_output_tokens"][row][1]] == f"__{tgt}__"
            seen.append((pair, batch["id"][row].item()))
    assert len(seen) == len(set(seen)) == 3 * NUM_EVAL
    assert sorted({pair for pair, _ in seen}) == sorted(PAIRS.split(","))


def test_stock_multilingual_task_drops_sentences_that_ours_keeps(data):
    # the fairseq behaviour this task works around (DESIGN.md); proves the check above can fail
    task = tasks.setup_task(parse_task_args(data))
    stock = eval_batches(task, "valid", partial(TranslationMultiSimpleEpochTask.get_batch_iterator, task))
    assert sum(len(batch["id"]) for batch in stock) < 3 * NUM_EVAL


def test_bleu_is_computed_per_direction_and_averaged(data, monkeypatch):
    # an oracle decoder: exact for every direction but zz-yy, where it reverses the words
    cfg = parse_config(data, "--eval-bleu", "--eval-bleu-args", '{"beam": 1}')
    task = tasks.setup_task(cfg.task)
    model, criterion = task.build_model(cfg.model), task.build_criterion(cfg.criterion)
    pad = task.target_dictionary.pad()
    prefixes = []

    def oracle(generator, models, sample, prefix_tokens=None):
        prefixes.append((prefix_tokens, sample["target"][:, :1]))
        out = []
        for target, pair in zip(sample["target"], sample["lang_pair"].tolist()):
            tokens = target[target != pad]  # language token, words, eos
            if task.lang_pairs[pair] == "zz-yy":
                tokens = torch.cat([tokens[:1], tokens[1:-1].flip(0), tokens[-1:]])
            out.append([{"tokens": tokens}])
        return out

    monkeypatch.setattr(task, "inference_step", oracle)
    with metrics.aggregate(new_root=True) as agg:
        for batch in eval_batches(task, "valid"):
            _, _, logging_output = task.valid_step(batch, model, criterion)
            task.reduce_metrics([logging_output], criterion)
        scores = agg.get_smoothed_values()
    # every row was decoded from its own target language token (--decoder-langtok)
    assert all(torch.equal(given, expected) for given, expected in prefixes)
    assert scores["bleu_xx-yy"] == scores["bleu_yy-xx"] == 100
    assert 0 < scores["bleu_zz-yy"] < 100
    assert scores["bleu"] == pytest.approx((200 + scores["bleu_zz-yy"]) / 3, abs=0.01)


@pytest.mark.parametrize("extra,message", [
    (["--lang-pairs", "xx-yy,xx-zz"], "--lang-pairs asks for xx-zz but"),
    (["--lang-pairs", "xx-yy,xx-ww"], "--lang-pairs names language 'ww' but its dictionary"),
    (["--langs", "xx,yy"], "--lang-pairs names zz, which --langs does not list"),
    (["--lang-pairs", "xx-yy,zz"], "--lang-pairs: 'zz' is not of the form SRC-TGT"),
    (["--source-lang", "xx", "--target-lang", "ww"], "--target-lang names ww, which --lang-pairs"),
])
def test_missing_pairs_and_languages_fail_clearly(data, extra, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        task = tasks.setup_task(parse_task_args(data, *extra))
        task.load_dataset("train")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("multilingual-ckpt")
    _, log = run("fairseq-train", data, "--cpu", *TASK, *MODEL,
                 "--criterion", "thor_consistency", "--label-smoothing", "0.1",
                 "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "1000",
                 "--max-update", "5", "--save-dir", ckpt, "--log-format", "simple",
                 "--log-interval", "1", "--no-epoch-checkpoints", "--seed", "3",
                 "--eval-bleu", "--eval-bleu-args", '{"beam": 1, "max_len_b": 12}',
                 "--eval-bleu-detok", "space", "--eval-bleu-print-samples",
                 "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric")
    return {"data": data, "ckpt": ckpt / "checkpoint_best.pt", "log": log}


def test_validation_logs_bleu_per_direction_and_their_mean(trained):
    line = re.search(r"valid on 'valid' subset \|.*", trained["log"]).group(0)
    scores = {pair: float(re.search(rf"\| bleu_{pair} ([\d.]+)", line).group(1)) for pair in PAIRS.split(",")}
    mean = float(re.search(r"\| bleu ([\d.]+)", line).group(1))
    assert mean == pytest.approx(sum(scores.values()) / 3, abs=0.01)
    assert f"| bsz {3 * NUM_EVAL} |" in line  # one batch holding every sentence of every direction
    assert "consistency=" in trained["log"]  # trained with THOR's criterion


def generate(trained, src, tgt, *extra, check=True):
    return run("fairseq-generate", trained["data"], "--cpu", *TASK, "--path", trained["ckpt"],
               "--source-lang", src, "--target-lang", tgt, "--gen-subset", "test",
               "--beam", "2", "--max-tokens", "1000", "--seed", "1", *extra, check=check)


@pytest.mark.parametrize("src,tgt", [("zz", "yy"), ("yy", "xx")])
def test_generate_decodes_every_test_sentence_of_a_direction(trained, src, tgt):
    _, out = generate(trained, src, tgt, "--inference-routing", "token")
    hyps = hypotheses(out)
    assert [i for i, _ in hyps] == list(range(NUM_EVAL))
    assert not any(h.startswith(f"__{tgt}__") for _, h in hyps)  # the target language token is stripped
    sources = re.findall(r"^S-\d+\t(.*)$", out, re.M)
    assert all(s.startswith(f"__{src}__ ") for s in sources)


@pytest.mark.parametrize("routing", ["sentence", "batch", "fixed", "mean", "merged"])
def test_every_inference_mode_decodes_a_direction(trained, routing):
    _, out = generate(trained, "xx", "yy", "--inference-routing", routing)  # token: test above
    assert [i for i, _ in hypotheses(out)] == list(range(NUM_EVAL))


@pytest.mark.parametrize("extra,message", [
    (["--num-experts", "3"], "--num-experts 3 does not match the model, which has 2 experts"),
    (["--inference-level", "0", "--inference-routing", "sentence"], "--inference-level 0 means 'token'"),
])
def test_bad_thor_decoding_flags_fail_clearly(trained, extra, message):
    code, out = generate(trained, "xx", "yy", *extra, check=False)
    assert code != 0 and message in out, out[-2000:]
