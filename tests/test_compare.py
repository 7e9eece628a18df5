"""benchmarks/compare.py: dense vs THOR vs gated routers through the real CLIs, at toy size."""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.models import ARCH_MODEL_REGISTRY

import fairseq_thor  # noqa: F401  (registers the plugin: routers_available() reads the registries)
from test_cli import NUM_TEST, REPO, make_toy_data

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import compare  # noqa: E402
import compare_report as report  # noqa: E402

pytestmark = pytest.mark.cli


def routers_available() -> bool:
    """The gated baselines exist once the model takes --expert-router and the MoE criterion is
    registered (``fairseq-train ... --expert-router switch --help`` exits 0 even when it does not:
    fairseq prints the help before it rejects unknown flags)."""
    parser = argparse.ArgumentParser()
    ARCH_MODEL_REGISTRY["thor_transformer"].add_args(parser)
    has_flag = any("--expert-router" in a.option_strings for a in parser._actions)
    return has_flag and "moe_label_smoothed_cross_entropy" in CRITERION_REGISTRY


MODELS = ["dense", "thor", "switch", "gshard", "hash"] if routers_available() else ["dense", "thor"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    data, out = make_toy_data(root), root / "out"
    proc = subprocess.run(
        [sys.executable, "benchmarks/compare.py", "--toy", "--data", str(data), "--models", ",".join(MODELS),
         "--remove-bpe", "none", "--work", str(root / "work"), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(out / "compare.json") as f:
        result = json.load(f)
    return {"out": out, "json": result, "md": (out / "compare.md").read_text(), "stdout": proc.stdout}


def test_json_has_every_model_with_numbers(compared):
    rows = {row["model"]: row for row in compared["json"]["models"]}
    assert list(rows) == MODELS
    for name, row in rows.items():
        assert row["status"] == "ok", row["error"]
        for key in ("bleu", "chrf", "valid_loss", "train_words_per_s", "decode_tokens_per_s"):
            assert isinstance(row[key], float) and row[key] >= 0, (name, key, row[key])
        for key in ("total_params", "active_params"):
            assert isinstance(row[key], int) and row[key] > 0, (name, key, row[key])
        assert row["sentences"] == NUM_TEST  # every test sentence decoded and scored
        assert [p["num_updates"] for p in row["valid_curve"]] == [5, 10]
    # same sizes: one active expert costs what the dense FFN costs, the others only add storage
    assert rows["thor"]["active_params"] == rows["dense"]["total_params"] == rows["dense"]["active_params"]
    assert rows["thor"]["total_params"] > rows["thor"]["active_params"]
    if "gshard" in rows:
        expert = rows["gshard"]["active_params"] - rows["switch"]["active_params"]
        assert expert == rows["thor"]["expert_ffn_params"] // 4  # top-2: one more expert of 4
        for name in ("switch", "gshard", "hash"):
            assert set(report.ROUTER_STATS) <= set(rows[name]["train_last"]), rows[name]["train_last"]


def test_markdown_has_a_numeric_row_per_model(compared):
    for name in MODELS:
        row = re.search(rf"^\| {name} +\| ok +\|(.*)\|$", compared["md"], re.M)
        assert row, compared["md"]
        cells = [c.strip() for c in row.group(1).split("|")]
        assert len(cells) == 7 and all(re.fullmatch(r"[\d,]+(\.\d+)?", c) for c in cells), cells
    assert "Failed" not in compared["md"]


def test_plot_is_written(compared):
    assert (compared["out"] / "valid_loss.png").stat().st_size > 1000


def test_a_failing_model_keeps_its_row_and_the_run_exits_nonzero(tmp_path, monkeypatch, capsys):
    def fake(args, row, env):
        if row["model"] == "switch":
            raise RuntimeError("fairseq-train exited 2\nfairseq-train: error: unrecognized arguments: "
                               "--expert-router switch")
        row.update(status="ok", bleu=1.0, chrf=2.0, valid_loss=3.0, total_params=10, active_params=5,
                   train_words_per_s=6.0, decode_tokens_per_s=7.0,
                   valid_curve=[{"num_updates": 5, "loss": 3.0, "nll_loss": 2.9}])

    monkeypatch.setattr(compare, "compare_one", fake)
    code = compare.main(["--data", str(tmp_path), "--models", "dense,switch,thor", "--device", "cpu",
                         "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert code == 1
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [(r["model"], r["status"]) for r in result["models"]] == [
        ("dense", "ok"), ("switch", "failed"), ("thor", "ok")]
    md = (tmp_path / "out" / "compare.md").read_text()
    assert re.search(r"^\| switch +\| failed +\| +— +\|", md, re.M)
    assert "- `switch`: fairseq-train: error: unrecognized arguments: --expert-router switch" in md
    assert "FAILED: switch" in capsys.readouterr().err


TRAIN_LOG = """\
2026-11-30 15:03:30 | INFO | fairseq_cli.train | num. shared model params: 8,138,752 (num. trained: 8,138,752)
2026-11-30 15:03:30 | INFO | fairseq_cli.train | num. expert model params: 0 (num. trained: 0)
2026-11-30 15:03:41 | INFO | train_inner | epoch 001:     10 / 329 loss=11.919, nll_loss=11.805, aux_loss=1.2015, expert_load_max=0.493, gate_entropy=1.3483, dropped=0.4015, ppl=3578.81, wps=1705.4, ups=1.01, wpb=1616.4, bsz=107.2, num_updates=10, lr=0.0003, gnorm=2.929, clip=100, train_wall=10, wall=11
2026-11-30 15:03:43 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 10.715 | nll_loss 10.475 | aux_loss 1.2 | ppl 1423.2 | wps 4515.9 | wpb 1103.4 | bsz 90.9 | num_updates 10
2026-11-30 15:03:52 | INFO | train_inner | epoch 001:     20 / 329 loss=10.326, nll_loss=10.024, aux_loss=1.3133, expert_load_max=0.5029, gate_entropy=1.3197, dropped=0.3679, ppl=1041.01, wps=1477, ups=0.91, wpb=1624.1, bsz=122.4, num_updates=20, lr=0.0006, gnorm=1.429, clip=100, train_wall=9, wall=22
2026-11-30 15:03:54 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 9.79 | nll_loss 9.433 | ppl 691.1 | wps 4654.1 | wpb 1103.4 | bsz 90.9 | num_updates 20 | best_loss 9.79
2026-11-30 15:03:54 | INFO | train | epoch 001 | loss 11.1 | nll_loss 10.9 | aux_loss 1.25 | ppl 1900 | wps 1413.9 | ups 0.86 | wpb 1620 | bsz 114.8 | num_updates 20 | lr 0.0006 | gnorm 2.1 | clip 95 | train_wall 20 | wall 26
2026-11-30 15:04:30 | INFO | train | epoch 002 | loss 9.1 | nll_loss 8.9 | aux_loss 1.1 | ppl 480 | wps 1000 | ups 0.5 | wpb 1000 | bsz 100 | num_updates 30 | lr 0.0009 | gnorm 1.1 | clip 90 | train_wall 5 | wall 40
2026-11-30 15:04:30 | INFO | fairseq_cli.train | done training in 39.0 seconds
"""
GENERATE_LOG = """\
S-1\tb c
T-1\tthe second
H-1\t-0.5\tthe second one
D-1\t-0.5\tthe second one
P-1\t-0.1 -0.2 -0.3
S-0\ta
T-0\tthe first
H-0\t-0.4\tthe first
INFO:fairseq_cli.generate:Translated 2 sentences (1,266 tokens) in 4.6s (136.14 sentences/s, 1,275.33 tokens/s)
"""


def test_train_log_parser():
    parsed = report.parse_train_log(TRAIN_LOG)
    assert parsed["total_params"] == 8138752
    assert parsed["num_updates"] == 30
    assert parsed["valid_curve"] == [{"num_updates": 10, "loss": 10.715, "nll_loss": 10.475},
                                     {"num_updates": 20, "loss": 9.79, "nll_loss": 9.433}]
    # (1620 * 20 + 1000 * 10) words in (20 + 5) s of training steps
    assert parsed["train_words_per_s"] == pytest.approx((1620 * 20 + 1000 * 10) / 25, abs=0.1)
    assert parsed["train_last"] == {"loss": 10.326, "nll_loss": 10.024, "aux_loss": 1.3133,
                                    "expert_load_max": 0.5029, "dropped": 0.3679, "gate_entropy": 1.3197}
    assert report.progress(TRAIN_LOG.splitlines()[3]) == "update    10: valid loss 10.715, nll_loss 10.475"


def test_short_runs_fall_back_to_fairseqs_wps():
    epochs = [{"wpb": 400, "num_updates": 5, "train_wall": 0, "wps": 100.0},
              {"wpb": 400, "num_updates": 10, "train_wall": 0, "wps": 300.0}]
    assert report.train_words_per_s(epochs) == 200.0


def test_generate_log_parser():
    parsed = report.parse_generate_log(GENERATE_LOG)
    assert parsed["hypotheses"] == ["the first", "the second one"]
    assert parsed["references"] == ["the first", "the second"]
    assert parsed["sentences"] == 2 and parsed["decode_tokens_per_s"] == 1275.33


def test_scores_report_the_brevity_penalty_and_length_ratio():
    refs = ["the cat sat on the mat today", "a dog ran in the park"]
    full = report.sacrebleu_scores(refs, refs)
    assert full["bleu"] == 100.0 and full["bleu_bp"] == 1.0 and full["length_ratio"] == 1.0
    short = report.sacrebleu_scores(["the cat sat", "a dog ran"], refs)  # half the words: penalised
    assert short["length_ratio"] == round(6 / 13, 3) and short["bleu_bp"] < 0.4


def test_active_params_count_one_expert_per_layer_or_two_for_top2():
    E, d, f = 4, 8, 16
    state = {"encoder.layers.0.fc1.weight": torch.zeros(E, f, d), "encoder.layers.0.fc1.bias": torch.zeros(E, f),
             "encoder.layers.0.fc2.weight": torch.zeros(E, d, f), "encoder.layers.0.fc2.bias": torch.zeros(E, d),
             "encoder.layers.1.fc1.weight": torch.zeros(f, d), "encoder.layers.1.fc1.bias": torch.zeros(f),
             "encoder.layers.0.gate.wg.weight": torch.zeros(E, d)}
    one_expert = 2 * d * f + f + d
    assert report.expert_ffn_numel(state, E) == E * one_expert
    assert report.expert_ffn_numel(state, 1) == 0
    total = 1000 + E * one_expert
    assert report.active_params(total, E * one_expert, E, 1) == 1000 + one_expert
    assert report.active_params(total, E * one_expert, E, 2) == 1000 + 2 * one_expert
