"""benchmarks/quality.py: the multi-seed study through the real CLIs at toy size (report, resume,
failed cells, clear errors) and the report's pure parts (views, spread, timing, plan order)."""
import json
import os
import re
import subprocess
import sys

import pytest

from test_cli import NUM_TEST, REPO, make_toy_data
from test_fairseq_logs import TRAIN_LOG

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import fairseq_logs as logs  # noqa: E402
import quality  # noqa: E402
import quality_cells  # noqa: E402
import quality_cells  # noqa: E402
import quality_report  # noqa: E402

pytestmark = pytest.mark.cli


# every kind of cell once: dense, R-Drop, THOR, a gated baseline (hash, which fails the first run and
# trains in the second); thor4 and switch take thor2's and hash's code with other flags (~20 s each)
MODELS = ["dense", "rdrop", "thor2", "hash"]
PLAN = ",".join(f"{m}:{2 if m in ('dense', 'thor2') else 1}" for m in MODELS)
FAILING = MODELS[-1]  # given a flag fairseq-train rejects in the first run only


def quality_cli(*args):
    return subprocess.run([sys.executable, "benchmarks/quality.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    out = root / "out"
    common = ["--toy", "--data", make_toy_data(root), "--remove-bpe", "none", "--plan", PLAN,
              "--work", root / "work", "--out", out]
    first = quality_cli(*common, "--extra", f"{FAILING}=--no-such-flag")
    cells = {p.name: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    second = quality_cli(*common)
    return {"root": root, "out": out, "first": first, "first_cells": cells, "mtimes": mtimes, "second": second,
            "json": json.loads((out / "quality.json").read_text()), "md": (out / "quality.md").read_text()}


def test_a_failed_cell_is_marked_the_others_finish_and_the_run_exits_1(study):
    first, cells = study["first"], study["first_cells"]
    assert first.returncode == 1, (first.stdout + first.stderr)[-3000:]
    assert cells[f"{FAILING}-seed1.json"]["status"] == "failed"
    assert "unrecognized arguments: --no-such-flag" in cells[f"{FAILING}-seed1.json"]["error"]
    assert f"FAILED {FAILING} seed 1" in first.stderr
    ok = {name for name, cell in cells.items() if cell["status"] == "ok"}
    assert ok == {f"{m}-seed{s}.json" for m in MODELS for s in (1, 2)
                  if m != FAILING and (s == 1 or m in ("dense", "thor2"))}
    # the seed-2 cells run after the failed seed-1 cell
    assert first.stdout.index(f"start {FAILING} seed 1") < first.stdout.index("done thor2 seed 2")


def test_a_rerun_skips_finished_cells_and_retries_the_failed_one(study):
    second = study["second"]
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    for name, cell in study["first_cells"].items():
        model, seed = re.fullmatch(r"(\w+)-seed(\d+)\.json", name).groups()
        if cell["status"] == "ok":
            assert re.search(rf"^\[\d+/\d+\] skip {model} seed {seed}: finished", second.stdout, re.M)
            assert (study["out"] / "cells" / name).stat().st_mtime_ns == study["mtimes"][name]
    assert re.findall(r"^\[\d+/\d+\] start (\w+ seed \d+)", second.stdout, re.M) == [f"{FAILING} seed 1"]
    assert not list((study["root"] / "work").rglob("*.pt"))  # checkpoints removed once a cell is written


def test_every_cell_records_what_produced_it(study):
    for path in (study["out"] / "cells").glob("*.json"):
        cell = json.loads(path.read_text())
        assert cell["status"] == "ok", cell["error"]
        assert cell["updates"] == 10 and [c["updates"] for c in cell["checkpoints"]][-1] == 10
        assert cell["equal_updates"]["updates"] == 10 and cell["checkpoints"][-1]["sentences"] == NUM_TEST
        assert [p["num_updates"] for p in cell["valid_curve"]] == [5, 10]
        assert all(isinstance(p["train_s"], float) for p in cell["valid_curve"])
        assert "--seed" in cell["train_command"] and cell["generate_commands"]
        assert cell["threads"] == 1 and cell["device"] == "cpu" and cell["host"]["cpu_count"] >= 1
        if cell["model"] in ("rdrop", "thor2"):  # one expert per token costs the dense FFN
            assert cell["active_params"] == study["json"]["models"]["dense"]["total_params"]
        # equal time: scored, or one-pass (= final), or a reason (toy times are whole seconds)
        assert "bleu" in cell["equal_time"] or "missing" in cell["equal_time"]


def test_the_report_has_every_model_with_mean_std_and_n(study):
    models = study["json"]["models"]
    assert list(models) == MODELS
    for name, m in models.items():
        n = 2 if name in ("dense", "thor2") else 1
        bleu = m["equal_updates"]["bleu"]
        assert bleu["n"] == n and (bleu["std"] is not None) == (n == 2), (name, bleu)
        row = re.search(rf"^\| {name} \| {n} \| ([\d.]+( ± [\d.]+)?) \| ([\d.]+( ± [\d.]+)?) \|", study["md"], re.M)
        assert row, study["md"]
    dense = next(d for d in study["json"]["differences"]
                 if d["difference"] == "thor2 - dense" and d["view"] == "equal_updates")
    assert isinstance(dense["bleu"]["beyond_spread"], bool) and dense["bleu"]["n"] == [2, 2]
    assert (study["out"] / "quality.png").stat().st_size > 1000


def test_report_only_rebuilds_from_the_cells(study):
    (study["out"] / "quality.md").unlink()
    proc = quality_cli("--report-only", "--out", study["out"])
    assert proc.returncode == 0, proc.stderr
    assert (study["out"] / "quality.md").read_text() == study["md"]


@pytest.mark.parametrize("args, expected", [
    (["--models", "dense,thor9"],
     r"--models: unknown model thor9; valid names: dense, rdrop, thor2, thor4, switch, hash"),
    (["--data", "NOPE"], r"--data \S*NOPE: no such folder; expected a fairseq-preprocess output folder"),
    (["--data", "."], r"--data \S+: no dict\.\*\.txt, .* in it; expected a fairseq-preprocess output folder"),
])
def test_bad_input_gives_one_clear_line(args, expected):
    proc = quality_cli(*args, "--out", os.devnull + "-unused")
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and re.search(expected, proc.stderr), proc.stderr


def test_plan_runs_seed_by_seed_with_dense_first(tmp_path):
    args = quality.parse_args(["--plan", "thor2:2,hash:1,dense:2"])
    assert args.cells == [("dense", 1), ("thor2", 1), ("hash", 1), ("dense", 2), ("thor2", 2)]
    args = quality.parse_args(["--models", "thor4,dense", "--seeds", "3,5"])
    assert args.cells == [("dense", 3), ("thor4", 3), ("dense", 5), ("thor4", 5)]
    default = quality.parse_args([]).cells
    assert {m: sum(1 for c in default if c[0] == m) for m in quality.MODELS if any(c[0] == m for c in default)} == {
        "dense": 3, "rdrop": 3, "thor2": 3, "thor4": 1, "switch": 3, "hash": 3}
    converge = quality.parse_args(["--converge", "--out", str(tmp_path)])  # no THOR cell scored there
    # the targets' comparisons first: THOR E=2 vs dense, hash, R-Drop, then E=4; E=8 last of seed 1
    assert sorted(quality.CONVERGE_ORDER) == sorted(quality.MODELS)
    assert converge.cells[:7] == [("dense", 1), ("thor2", 1), ("hash", 1), ("rdropf", 1), ("thor4", 1),
                                  ("thor2a5", 1), ("switch", 1)]
    assert converge.cells[7:] == [("thor8", 1), ("dense", 2), ("hash", 2), ("rdropf", 2)]
    assert ("rdropf", 2) in converge.cells and not any(m == "rdrop" for m, _ in converge.cells)
    assert {m: sum(1 for c in converge.cells if c[0] == m) for m in ("dense", "rdropf", "hash", "thor2a5")} == {
        "dense": 2, "rdropf": 2, "hash": 2, "thor2a5": 1}
    assert (converge.dropout, converge.patience) == (0.3, 8)
    assert quality.parse_args(["--converge"]).out.endswith("results/convergence")
    assert quality.parse_args([]).dropout == 0.1  # the 1,000-update study's recipe is unchanged


def test_best_thor_in_the_plan_waits_for_every_thor_setting_then_adds_the_validation_best(tmp_path, capsys):
    plan = ["--converge", "--out", str(tmp_path), "--plan", "dense:1,thor2:1,thor4:1,best-thor:2"]
    assert quality.parse_args(plan).cells == [("dense", 1), ("thor2", 1), ("thor4", 1)]
    assert "best-thor: decided once thor2, thor4 are scored (waiting for thor2, thor4)" in capsys.readouterr().out
    args = quality.parse_args(plan)
    (tmp_path / "cells").mkdir()

    def scored(model, test_bleu, valid_bleu, **settings):
        view = {"bleu": test_bleu, "chrf": 50.0, "updates": 100, "train_s": 1.0}
        cell = {"model": model, "seed": 1, "status": "ok", "two_pass": True, "updates": 120, "train_s": 1.0,
                "settings": {**quality.settings(args), **settings}, "best": dict(view, valid_bleu=valid_bleu),
                "averaged": view, "equal_time": view, "stopped_by": "patience", "train_words_per_s": 1.0,
                "total_params": 10, "active_params": 5}
        (tmp_path / "cells" / f"{model}-seed1.json").write_text(json.dumps(cell))

    scored("thor2", 30.0, 35.0)
    scored("thor4", 31.0, 36.0, dropout=0.1)  # another recipe: not a scored thor4 of this study
    assert ("thor4", 2) not in quality.parse_args(plan).cells and "waiting for thor4" in capsys.readouterr().out
    scored("thor4", 31.0, 34.0)  # better on test, worse on validation
    cells = quality.parse_args(plan).cells
    assert cells == [("dense", 1), ("thor2", 1), ("thor4", 1), ("thor2", 2)]
    assert "best-thor: thor2, the highest mean validation BLEU of thor2, thor4" in capsys.readouterr().out
    for wrong in (["--plan", "dense:1,best-thor:2", "--converge"], ["--plan", "thor2:1,best-thor:2"]):
        with pytest.raises(SystemExit):
            quality.parse_args(wrong)
        assert "best-thor: needs --converge and THOR settings" in capsys.readouterr().err


def test_rdropf_is_rdrop_s_objective_through_the_plugin_s_loss():
    args = quality.parse_args(["--converge", "--rdrop-alpha", "0.7", "--consistency-alpha-warmup-updates", "50"])
    args.device_flags, args.data = ["--cpu"], "DATA"  # set by main() once the corpus exists
    fast = quality_cells.train_command(args, "rdropf", 1, "SAVE")
    fairseq_rdrop = quality_cells.train_command(args, "rdrop", 1, "SAVE")
    flag = lambda cmd, name: cmd[cmd.index(name) + 1]  # noqa: E731
    assert flag(fast, "--criterion") == "thor_consistency" and flag(fast, "--consistency-alpha") == "0.7"
    assert flag(fast, "--num-experts") == flag(fairseq_rdrop, "--num-experts") == "1"
    assert "--consistency-alpha-warmup-updates" not in fast  # R-Drop has no warm-up: neither does its twin
    assert quality.MODELS["rdropf"].two_pass
    assert ("rdropf", 2) in args.cells and ("rdrop", 1) not in args.cells  # the plan's R-Drop rows


def test_train_time_per_update_sums_train_inner_train_wall():
    assert logs.train_seconds_by_update(TRAIN_LOG) == {10: 10.0, 20: 19.0}


def cell(model, seed, checkpoints, two_pass=True, **extra):
    return {"model": model, "seed": seed, "status": "ok", "two_pass": two_pass, "settings": {},
            "checkpoints": checkpoints, "train_s": checkpoints[-1]["train_s"], "train_words_per_s": 1.0,
            "total_params": 10, "active_params": 5, **extra}


def test_equal_time_takes_the_last_checkpoint_within_dense_time():
    ckpts = [{"updates": 5, "train_s": 40.0, "bleu": 1.0, "chrf": 10.0},
             {"updates": 10, "train_s": 80.0},  # not decoded
             {"updates": 15, "train_s": 120.0, "bleu": 3.0, "chrf": 30.0}]
    thor = cell("thor2", 1, ckpts)
    assert quality_report.views(thor, 60.0)["equal_time"] == {
        "updates": 5, "train_s": 40.0, "bleu": 1.0, "chrf": 10.0, "budget_s": 60.0}
    assert "not decoded" in quality_report.views(thor, 90.0)["equal_time"]["missing"]
    assert "no checkpoint within" in quality_report.views(thor, 30.0)["equal_time"]["missing"]
    assert "no finished dense cell" in quality_report.views(thor, None)["equal_time"]["missing"]
    assert quality_report.views(thor, 500.0)["equal_time"]["updates"] == 15
    switch = cell("switch", 1, ckpts, two_pass=False)
    assert quality_report.views(switch, 1.0)["equal_time"]["updates"] == 15  # one pass: final


def test_differences_beyond_the_seeds_spread():
    def final(bleu, seconds=100.0):
        return [{"updates": 10, "train_s": seconds, "bleu": bleu, "chrf": bleu * 2}]

    cells = [cell("dense", s, final(b), two_pass=False) for s, b in ((1, 10.0), (2, 12.0))]
    cells += [cell("thor2", s, final(b, 200.0)) for s, b in ((1, 15.0), (2, 16.0))]
    cells += [cell("switch", 1, final(13.0), two_pass=False)]
    result = quality_report.summarize(cells, list(quality.MODELS))
    assert result["models"]["dense"]["equal_updates"]["bleu"] == {"n": 2, "mean": 11.0, "std": 1.414}
    by = {(d["difference"], d["view"]): d for d in result["differences"]}
    assert by[("thor2 - dense", "equal_updates")]["bleu"] == {
        "delta": 4.5, "spread": 2.121, "n": [2, 2], "beyond_spread": True}
    assert by[("thor2 - switch", "equal_updates")]["bleu"]["beyond_spread"] is None  # one switch seed
    assert ("thor2 - dense", "equal_time") not in by  # thor2's checkpoints are all past dense's 100 s
    assert "no checkpoint within dense's 100 s" in quality_report.markdown(result)


def test_a_changed_recipe_is_named():
    old = {"train_flags": ["DATA", "--lr", "0.001", "--fp16"], "remove_bpe": "none", "threads": 1}
    new = {"train_flags": ["DATA", "--lr", "0.002"], "remove_bpe": "none", "threads": None}
    assert quality_cells.recipe_change(old, old) is None
    assert quality_cells.recipe_change(old, new) == "--fp16 (set) -> (absent); --lr 0.001 -> 0.002; threads 1 -> None"
