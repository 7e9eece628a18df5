"""benchmarks/gpu/: the prepared GPU check, rehearsed on the CPU so that it cannot rot between GPU
runs (what a GPU run does differently is only the sizes, the precision flags and the install)."""
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import needs_catalogs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks", "gpu"))
import check_steps  # noqa: E402

TRAIN_INNER = ("2026-12-03 | INFO | train_inner | epoch 001:  {u} / 282 loss={loss}, nll_loss=9.1, "
               "consistency={c}, ppl=500, wps=9000, num_updates={u}, lr=0.001")
OVERFLOW = "2026-12-03 | INFO | fairseq.trainer | NOTE: gradient overflow detected, ignoring gradient, setting loss scale to: 64.0"


def test_training_log_reading_counts_losses_and_overflow_skips(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("\n".join([OVERFLOW, TRAIN_INNER.format(u=25, loss=12.5, c=0.2), OVERFLOW,
                              TRAIN_INNER.format(u=50, loss="nan", c=0.1)]) + "\n")
    losses, consistency, updates, overflows = check_steps.read_training_log(log)
    assert losses[0] == 12.5 and losses[1] != losses[1]  # nan is read as nan, to be caught
    assert consistency == [0.2, 0.1] and updates == 50 and overflows == 2


def test_a_step_past_its_limit_is_killed_and_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(check_steps, "MIN_STEP_S", 0)
    check = check_steps.Check(SimpleNamespace(out=str(tmp_path), budget_s=60, rehearsal=True,
                                              install_json="", bundle=""))
    step, _ = check.run("sleeper", ["bash", "-c", "sleep 60 & wait"], limit_s=1)
    assert step["status"] == "timeout" and step["seconds"] < 30
    check.left = lambda: 10  # 5 s are kept back for the report: 5 s left, under a step's minimum
    monkeypatch.setattr(check_steps, "MIN_STEP_S", 20)
    step, _ = check.run("none-left", ["true"], limit_s=100)
    assert step["status"] == "skipped" and step["reason"] == "out of time"


@pytest.mark.cli
@needs_catalogs
def test_the_cpu_rehearsal_runs_every_step(demo_corpus, tmp_path):
    # a bundle holding only the demo's (toy) corpus, as `make gpu-bundle` lays it out for the GPU run
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_corpus, bundle / "demo")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PY=sys.executable, BUNDLE=str(bundle))
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu", "check.sh"), str(out), "--rehearsal"],
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.load(open(out / "check.json"))
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["install", "cuda_tests", "demo_fp16", "demo_bf16", "speed_e4", "speed_e16", "memory"]
    assert report["rehearsal"] and report["environment"]["fairseq"][0].isdigit()
    assert steps["install"]["status"] == steps["demo_bf16"]["status"] == "skipped"
    assert all(steps[n]["status"] == "ok" for n in ["cuda_tests", "demo_fp16", "speed_e4", "speed_e16", "memory"])
    assert steps["cuda_tests"]["passed"] > 30 and "failed" not in steps["cuda_tests"]
    demo = steps["demo_fp16"]
    assert demo["corpus"] == f"copied from {bundle / 'demo'}"  # as on the GPU, which has no catalogs
    assert demo["decoded"] > 0 and demo["updates"] == 6  # decoded < test sentences fails the step and demo["last_loss"] < demo["first_loss"]
    assert demo["overflows"] == 0 and demo["bleu"] is not None
    assert set(steps["speed_e4"]["decode_ratios"]) == {"thor E=1", "thor E=4", "thor E=16"}
    assert 0 < steps["speed_e4"]["train_ratio"] and steps["speed_e4"]["train_ratio_fused"] > 0
    assert set(steps["memory"]["peak_mib"]) == {"1", "4"}
    assert (out / "check.log").stat().st_size > 0 and (out / "demo_fp16-train.log").exists()
