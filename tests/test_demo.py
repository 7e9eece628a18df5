"""`make demo`: the progress filter's ETA, and the whole script end to end at toy size."""
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import TOY_DEMO, needs_catalogs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples", "demo"))
import progress  # noqa: E402

TRAIN_INNER = ("2026-12-01 01:30:37 | INFO | train_inner | epoch 001:     50 / 282 loss=21.238, "
               "nll_loss=10.226, consistency=0.0386, consistency_alpha=1, ppl=1197.57, wps=535.7, "
               "ups=0.34, wpb=1571.5, bsz=163.5, num_updates={u}, lr=0.0005, gnorm=2.593, "
               "train_wall=73, wall={wall}")
VALID = ("2026-12-01 01:40:00 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 8.345 | "
         "nll_loss 7.56 | ppl 188.66 | wps 2977.8 | wpb 1137.7 | bsz 106 | num_updates 200")


def filter_lines(lines, max_update=800, minutes=25):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "demo", "progress.py"),
                           "--max-update", str(max_update), "--minutes", str(minutes)],
                          input="".join(line + "\n" for line in lines), text=True,
                          capture_output=True, check=True)
    return proc.stdout.splitlines()


def test_eta_is_the_remaining_updates_at_the_pace_so_far():
    # 200 of 800 updates in 300 s: 600 more at 1.5 s each = 900 s
    (line,) = filter_lines([TRAIN_INNER.format(u=200, wall=300)])
    assert "update   200/800 ( 25%)" in line
    assert "elapsed 5m00s" in line and "ETA 15m00s" in line
    assert "loss 21.238" in line and "consistency 0.0386" in line and "535.7 words/s" in line


def test_eta_is_capped_by_the_time_bound():
    # the same pace would need 900 s more, but the 10-minute bound leaves 300 s
    (line,) = filter_lines([TRAIN_INNER.format(u=200, wall=300)], minutes=10)
    assert "ETA 5m00s" in line


def test_validation_and_errors_pass_through_and_noise_does_not():
    out = filter_lines([VALID, "some | INFO | fairseq.tasks | loaded 636 examples",
                        "Traceback (most recent call last):", "ValueError: --lr is bad"])
    assert out[0].strip() == "validation after update 200: loss 8.345  ppl 188.66"
    assert out[1:] == ["    Traceback (most recent call last):", "    ValueError: --lr is bad"]


def run_demo(corpus, work, **knobs):
    """run.sh in ``work``, holding a copy of the shared toy corpus (the demo_corpus fixture built it
    with run.sh's own steps 1-3), so that it goes straight to training."""
    shutil.copytree(corpus, work)
    env = dict(os.environ, WORK=str(work), MAX_UPDATE="4", LOG_INTERVAL="2", **TOY_DEMO,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", "demo", "run.sh")], cwd=REPO,
                          env={**env, **knobs}, text=True, capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def readme_minutes():
    """The demo's duration as the README states it ("**`make demo`** (N minutes ...")."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return int(re.search(r"\*\*`make demo`\*\* \((\d+) minutes", f.read()).group(1))


@pytest.mark.cli
@needs_catalogs
def test_demo_runs_end_to_end_and_decodes_every_test_sentence(demo_corpus, tmp_path):
    out = run_demo(demo_corpus, tmp_path / "demo")
    # the expected duration is said up front, as the README says it
    assert f"make demo: about {readme_minutes()} minutes" in out
    assert "FutureWarning" not in out and "NOTE:" not in out
    assert "update     4/4 (100%)" in out and "ETA 0m00s" in out
    test_sentences = sum(1 for _ in open(tmp_path / "demo" / "raw" / "test.de", encoding="utf-8"))
    assert f"decoded {test_sentences} of {test_sentences} test sentences" in out
    bleu = [line for line in out.splitlines() if line.strip().startswith("BLEU  =")]
    assert len(bleu) == 1 and float(bleu[0].split("=")[1]) >= 0
    assert out.count("    HYP: ") == 5
    # the two ways to translate your own sentences that the demo prints work as printed
    printed = out[out.index("==> translate your own sentences"):].splitlines()[1:]
    command_lines = [line.strip() for line in printed if line.startswith("    ")]
    interactive = " ".join(line.rstrip("\\").strip() for line in command_lines[:2])
    python = "\n".join(command_lines[2:6])
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    for command in (interactive, python):
        proc = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
        assert proc.returncode == 0, command + "\n" + proc.stderr[-2000:]
        assert proc.stdout.strip(), command  # a translation (quality is not the point at toy size)


@pytest.mark.cli
@needs_catalogs
def test_a_demo_stopped_by_its_time_guard_says_so_and_what_it_takes(demo_corpus, tmp_path):
    out = run_demo(demo_corpus, tmp_path / "demo", MAX_UPDATE="100000", TRAIN_MINUTES="0.01")
    note = out[out.index("NOTE: the TRAIN_MINUTES=0.01 guard stopped training after "):]
    reached = int(re.match(r"NOTE: the TRAIN_MINUTES=0.01 guard stopped training after (\d+) of 100000", note).group(1))
    assert 0 < reached < 100000
    assert re.search(r"rerun with TRAIN_MINUTES=\d+", note)
    assert f"sacreBLEU (detokenized, de->en test split) after only {reached} of 100000 updates" in out
