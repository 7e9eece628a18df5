"""Serving a THOR model as a plain transformer, through the real commands at toy size: a
single-expert export decodes exactly like THOR's fixed routing, CTranslate2 under the written decode
settings gives fairseq-generate's hypotheses, and every bad input is one line."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from test_checkpoint_files import flip_bytes_inside_largest_entry
from test_cli import BIN, MODEL, REPO, make_toy_data, run

pytestmark = pytest.mark.cli
ctranslate2 = pytest.importorskip("ctranslate2", reason="pip install '.[serve]' (make venv installs it)")
NUM_EXPERTS = 3  # MODEL's


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    data, ckpt = make_toy_data(root), root / "ckpt"
    run("fairseq-train", data, "--user-dir", "fairseq_thor", "--cpu", "--task", "translation_thor", *MODEL,
        "--criterion", "thor_consistency", "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "1000",
        "--max-update", "150", "--save-dir", ckpt, "--no-epoch-checkpoints", "--seed", "3",
        "--validate-interval", "1000")
    return {"root": root, "data": data, "ckpt": ckpt / "checkpoint_last.pt"}


def hypotheses(output):
    """{sentence id: (score, tokens)} of fairseq-generate's H- lines."""
    return {int(m.group(1)): (m.group(2), m.group(3))
            for m in re.finditer(r"^H-(\d+)\t(\S+)\t(.*)$", output, re.M)}


def sources(output):
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^S-(\d+)\t(.*)$", output, re.M)}


def stock_generate(toy, checkpoint, *extra):
    """fairseq-generate without the plugin: what a deploying user runs on the export."""
    _, out = run("fairseq-generate", toy["data"], "--cpu", "--path", checkpoint, "--gen-subset", "test",
                 "--max-tokens", "1000", "--required-batch-size-multiple", "1", *extra)
    return out


def thor_generate(toy, *extra):
    _, out = run("fairseq-generate", toy["data"], "--user-dir", "fairseq_thor", "--cpu", "--task", "translation_thor",
                 "--path", toy["ckpt"], "--gen-subset", "test", "--max-tokens", "1000", *extra)
    return out


def one_error_line(code, out, *fragments):
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 1 and "Traceback" not in out and len(errors) == 1, out[-3000:]
    assert all(f in errors[0] for f in fragments), errors[0]


@pytest.mark.parametrize("expert", [0, 2])
def test_a_single_expert_export_decodes_exactly_like_fixed_routing(toy, tmp_path, expert):
    dense = tmp_path / "dense.pt"
    _, out = run("fairseq-thor-export-dense", toy["ckpt"], "--out", dense, "--expert", expert)
    assert f"expert {expert} in each of 2 expert layers ({NUM_EXPERTS} experts)" in out
    exported = stock_generate(toy, dense, "--beam", "4")
    routed = thor_generate(toy, "--beam", "4", "--inference-routing", "fixed", "--inference-expert", str(expert))
    assert len(hypotheses(exported)) == 13 and hypotheses(exported) == hypotheses(routed)  # scores too


def test_merged_stays_available_by_name_and_best_is_the_lowest_validation_loss(toy, tmp_path):
    _, out = run("fairseq-thor-export-dense", toy["ckpt"], "--out", tmp_path / "merged.pt", "--expert", "merged")
    assert "the experts' average in each of 2 expert layers" in out
    state = torch.load(toy["ckpt"], weights_only=True)["model"]
    merged = torch.load(tmp_path / "merged.pt", weights_only=True)["model"]
    bank = "encoder.layers.0.fc1.weight"
    assert torch.allclose(merged[bank], state[bank].mean(dim=0))
    _, out = run("fairseq-thor-export-dense", toy["ckpt"], "--out", tmp_path / "best.pt", "--expert", "best",
                 "--data-dir", toy["data"])
    losses = [float(x) for x in re.search(r"validation nll per expert: (.*)\)", out).group(1).split(", ")
              for x in [x.split(": ")[1]]]
    assert len(losses) == NUM_EXPERTS and len(set(losses)) == NUM_EXPERTS
    best = min(range(NUM_EXPERTS), key=lambda k: losses[k])
    assert f"expert {best} in each of 2 expert layers" in out
    chosen = torch.load(tmp_path / "best.pt", weights_only=True)["model"]
    assert torch.equal(chosen[bank], state[bank][best])


def test_the_exports_refuse_bad_input_in_one_line(toy, tmp_path):
    for tool, extra in (("fairseq-thor-export-dense", ["--out", tmp_path / "x.pt"]),
                        ("fairseq-thor-export-ctranslate2", ["--data-dir", toy["data"], "--out", tmp_path / "x"])):
        code, out = run(tool, toy["ckpt"], *extra, "--expert", "3", check=False)
        one_error_line(code, out, "--expert 3: expected an expert index 0..2, 'best'", "'merged'")
        damaged = tmp_path / "checkpoint_damaged.pt"
        shutil.copy(toy["ckpt"], damaged)
        flip_bytes_inside_largest_entry(damaged)
        code, out = run(tool, damaged, *extra, check=False)
        one_error_line(code, out, f"checkpoint {damaged} cannot be used", "fails the CRC check")
        switch = tmp_path / "switch.pt"  # the same weights, declared a Switch model: a gate decides
        state = torch.load(toy["ckpt"], weights_only=True)
        state["cfg"]["model"].expert_router = "switch"
        torch.save(state, switch)
        code, out = run(tool, switch, *extra, check=False)
        one_error_line(code, out, "--expert-router switch model: its gate chooses between the experts")
    code, out = run("fairseq-thor-export-dense", toy["ckpt"], "--out", tmp_path / "x.pt", "--expert", "best",
                    check=False)
    one_error_line(code, out, "--expert best scores each expert on a validation split: give --data-dir")
    assert not os.path.exists(tmp_path / "x.pt") and not os.path.exists(tmp_path / "x")
    (tmp_path / "taken").mkdir()
    code, out = run("fairseq-thor-export-ctranslate2", toy["ckpt"], "--data-dir", toy["data"], "--out",
                    tmp_path / "taken", check=False)
    one_error_line(code, out, f"--out {tmp_path / 'taken'} exists")


def ct2_tokens(model_dir, sentences, **options):
    from fairseq_thor.serving.translator import Translator

    return Translator(str(model_dir), **options).translate(sentences)


@pytest.fixture(scope="module")
def expert1_dense(toy):
    """Expert 1 exported as a stock transformer: the reference every CTranslate2 setting decodes against."""
    dense = toy["root"] / "expert1-dense.pt"
    run("fairseq-thor-export-dense", toy["ckpt"], "--out", dense, "--expert", "1")
    return dense


@pytest.mark.parametrize("beam,limits", [(1, []), (5, []), (3, ["--max-len-a", "0.5", "--max-len-b", "2"]),
                                         (4, ["--min-len", "6"])])
def test_ctranslate2_float32_gives_fairseq_generates_hypotheses(toy, expert1_dense, tmp_path, beam, limits):
    model = tmp_path / "ct2"
    run("fairseq-thor-export-ctranslate2", toy["ckpt"], "--data-dir", toy["data"], "--out", model,
        "--expert", "1", "--beam", beam, *limits)
    settings = json.loads((model / "fairseq_decoding.json").read_text())
    assert settings["beam"] == beam and settings["expert"] == "1"
    # batch size 1: fairseq applies the longest source's length limit to its whole batch
    reference = stock_generate(toy, expert1_dense, "--beam", str(beam), "--batch-size", "1", *limits)
    wanted, src = hypotheses(reference), sources(reference)
    ids = sorted(src)
    got = dict(zip(ids, ct2_tokens(model, [src[i] for i in ids])))
    a, b = settings["max_len_a"], settings["max_len_b"]
    limit = {i: int(a * (len(src[i].split()) + 1) + b) for i in ids}
    # where the length limit binds, fairseq forces and scores an EOS and CTranslate2 stops without
    # one, so the best of the cut hypotheses can differ (either side may pick the hypothesis at the
    # limit); both stay within the limit, and below it they agree
    free = [i for i in ids if max(len(wanted[i][1].split()), len(got[i].split())) < limit[i]]
    assert all(len(got[i].split()) <= limit[i] for i in ids)
    if limits[:1] == ["--min-len"]:
        # fairseq bans EOS below --min-len without renormalising, CTranslate2 renormalises the rest:
        # the same length rule, other scores for the prefixes, so other hypotheses can win
        assert min(len(h.split()) for h in got.values()) >= 6  # the toy sentences are 3-9 tokens: it bound
        assert min(len(h.split()) for _, h in wanted.values()) >= 6
        return
    assert [got[i] for i in free] == [wanted[i][1] for i in free]
    if limits[:1] == ["--max-len-a"]:
        assert 0 < len(free) < len(ids)  # the limit bound for some sentences, not for all
    else:
        assert len(free) == len(ids)


def test_int8_ctranslate2_translates_and_refuses_a_source_longer_than_the_model(toy, tmp_path):
    from fairseq_thor.errors import ThorError

    model = tmp_path / "ct2-int8"
    run("fairseq-thor-export-ctranslate2", toy["ckpt"], "--data-dir", toy["data"], "--out", model,
        "--quantization", "int8")
    out = ct2_tokens(model, ["s1 s2 s3", "s4"])
    assert len(out) == 2 and all(out)
    with pytest.raises(ThorError, match="more than the model's 1023"):
        ct2_tokens(model, ["s1 " * 1100])
    proc = subprocess.run([sys.executable, "-m", "fairseq_thor.serving.translator", str(model)], input="s1 s2\n",
                          text=True, capture_output=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]


def readme_python_snippet():
    """The README's Python translation example (the block after "Translate your own sentences")."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("### Translate your own sentences"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_hub_snippet_and_fairseq_interactive_translate(toy, tmp_path):
    snippet = readme_python_snippet()
    # the README's paths are make demo's; point them at the toy model, and use its tokens
    replaced = (snippet.replace("work/demo/checkpoints", str(toy["ckpt"].parent))
                .replace("work/demo/data-bin-8000", str(toy["data"])))
    replaced = re.sub(r"bpe=\"sentencepiece\",\s*sentencepiece_model=\"[^\"]+\",\s*", "", replaced)
    replaced = replaced.replace('"Die Datei wurde nicht gefunden."', '"s1 s2 s3"')
    replaced = replaced.replace('"fairseq_thor"', repr(os.path.join(REPO, "fairseq_thor")))
    assert replaced != snippet and "from_pretrained" in replaced
    proc = subprocess.run([sys.executable, "-c", replaced], text=True, capture_output=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hub = proc.stdout.strip().splitlines()[-1].split()
    assert hub and all(re.fullmatch(r"t\d+", token) for token in hub), proc.stdout  # the toy target language
    _, out = run("fairseq-interactive", toy["data"], "--user-dir", "fairseq_thor", "--cpu", "--task",
                 "translation_thor", "--path", toy["ckpt"], "--beam", "5", stdin="s1 s2 s3\ns4 s5\n")
    interactive = hypotheses(out)
    assert sorted(interactive) == [0, 1] and all(re.fullmatch(r"(t\d+ ?)+", h) for _, h in interactive.values())
    assert os.path.isfile(os.path.join(BIN, "fairseq-interactive"))


def test_the_inference_modes_benchmark_scores_every_mode_and_checks_the_export(toy, tmp_path):
    out = tmp_path / "modes"
    proc = subprocess.run([sys.executable, "benchmarks/inference_modes.py", "--data", toy["data"], "--remove-bpe",
                           "none", "--checkpoint", f"toy={toy['ckpt']}", "--threads", "1", "--out", out],
                          cwd=REPO, text=True, capture_output=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    cell = json.loads((out / "modes.json").read_text())["checkpoints"]["toy"]
    expected = {"sentence", "token", "path", "mean", "merged", "export-0 (stock fairseq)",
                *(f"fixed-{k}" for k in range(NUM_EXPERTS))}
    assert set(cell["modes"]) == expected and cell["num_experts"] == NUM_EXPERTS
    # every test sentence decoded in every mode: test_cli leaves these modes to this test
    assert all(row["sentences"] == 13 and row["decode_s"] >= 0 for row in cell["modes"].values())
    assert cell["export_equals_fixed_0"] is True
    assert cell["modes"]["export-0 (stock fairseq)"]["bleu"] == cell["modes"]["fixed-0"]["bleu"]
    assert "| fixed-2 |" in (out / "modes.md").read_text()

    # the same name from another checkpoint would be pooled with the first: refused before decoding,
    # and the results already there are kept
    other = tmp_path / "other.pt"
    shutil.copyfile(toy["ckpt"], other)
    before = (out / "modes.json").read_text()
    again = subprocess.run([sys.executable, "benchmarks/inference_modes.py", "--data", toy["data"], "--remove-bpe",
                            "none", "--checkpoint", f"toy={other}", "--out", out],
                           cwd=REPO, text=True, capture_output=True, timeout=300)
    assert again.returncode == 2 and "--replace" in again.stderr and "toy" in again.stderr, again.stderr[-2000:]
    assert (out / "modes.json").read_text() == before


def test_the_serving_benchmark_measures_every_system_side_by_side(toy, tmp_path):
    out = tmp_path / "serving.json"
    raw = toy["root"] / "raw"
    proc = subprocess.run([sys.executable, "benchmarks/serving.py", "--checkpoint", toy["ckpt"], "--data", toy["data"],
                           "--source", raw / "test.src", "--references", raw / "test.tgt", "--threads", "1",
                           "--rounds", "1", "--out", out], cwd=REPO, text=True, capture_output=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = json.loads(out.read_text())["results"]["1"]
    assert set(rows) == {"thor-path", "dense", "ct2-float32", "ct2-int8"}
    for row in rows.values():
        assert row["sentences"] == 13 and row["target_tokens"] > 13 and row["tokens_per_s"] > 0
        assert 0 <= row["bleu"] <= 100
    assert rows["thor-path"]["speedup_tokens_per_s"] == 1.0
    # the dense export and CTranslate2 float32 decode the same model the same way (no binding limit here)
    assert rows["dense"]["bleu"] == rows["ct2-float32"]["bleu"] and rows["ct2-float32"]["identical_to_dense"] == 1.0
    assert "| 1 | ct2-int8 |" in proc.stdout


def test_parallel_translators_give_the_same_hypotheses_in_input_order(toy, tmp_path):
    from fairseq_thor.errors import ThorError
    from fairseq_thor.serving.translator import Translator

    model = tmp_path / "ct2"
    # a length limit per source length: several groups, queued together on two translators
    run("fairseq-thor-export-ctranslate2", toy["ckpt"], "--data-dir", toy["data"], "--out", model,
        "--max-len-a", "1", "--max-len-b", "1")
    sentences = (toy["root"] / "raw" / "train.src").read_text().splitlines()[:40]
    assert len({len(s.split()) for s in sentences}) > 2
    one = Translator(str(model), threads=1, max_batch_size=2).translate(sentences)
    two = Translator(str(model), threads=2, max_batch_size=2).translate(sentences)
    assert one == two and len(one) == len(sentences)
    with pytest.raises(ThorError, match="threads must be >= 1"):
        Translator(str(model), threads=0)


def test_inference_modes_results_of_another_test_split_or_checkpoint_are_not_pooled():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from inference_modes import refused_mix

    held = {"test_sentences": 626, "checkpoints": {"thor2-seed1": {"checkpoint": "a/checkpoint_last.pt"}}}
    assert refused_mix({"checkpoints": {}}, 13, {"x": "b.pt"}, replace=False) == []  # an empty --out takes anything
    assert refused_mix(held, 626, {"thor2-seed2": "b.pt", "thor2-seed1": "a/checkpoint_last.pt"}, False) == []
    [split] = refused_mix(held, 13, {"thor2-seed2": "b.pt"}, False)
    assert "626-sentence" in split and "13" in split
    [name] = refused_mix(held, 626, {"thor2-seed1": "b.pt"}, False)
    assert "thor2-seed1" in name and "--replace" in name
    assert refused_mix(held, 626, {"thor2-seed1": "b.pt"}, True) == []
