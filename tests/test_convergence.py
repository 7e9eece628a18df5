"""benchmarks/quality.py --converge at toy size through the real CLIs: patience stops a run before
its cap, an interrupted cell resumes from its own checkpoint and ends where an uninterrupted one
does, the averaged checkpoint is the mean of the last files, and the report pools only one recipe."""
import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from test_cli import REPO, make_toy_data

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import cell_claim  # noqa: E402
import convergence_carry  # noqa: E402
import convergence_cells  # noqa: E402
import convergence_report  # noqa: E402
import paired_significance  # noqa: E402

pytestmark = pytest.mark.cli
CAP = 40  # the toy --converge cap; patience 2 at one validation per 5 updates stops far sooner


def start(data, work, out, *extra):
    cmd = [sys.executable, "benchmarks/quality.py", "--converge", "--toy", "--data", data, "--remove-bpe", "none",
           "--work", work, "--out", out, *map(str, extra)]
    return subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def converge(data, work, out, *extra, kill_when=None):
    """Run the study; with ``kill_when`` (a glob), kill it (and its fairseq-train) once a file
    matching it exists, as a session's end would."""
    proc = start(data, work, out, *extra)
    if kill_when:
        deadline = time.time() + 600
        while not glob.glob(str(kill_when)) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate(timeout=900)[0]
    return proc.returncode, output


def cell_of(out, name="thor2-seed1.json"):
    return json.loads((out / "cells" / name).read_text())


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("converge")
    data = make_toy_data(root)
    cost = converge(data, root / "work", root / "out", "--plan", "dense:1,thor2:1", "--measure-cost")
    whole = converge(data, root / "work", root / "out", "--plan", "dense:1,thor2:1", "--keep")
    # the same thor2 cell, killed once its second checkpoint exists, then run again with other threads
    checkpoints = root / "work-killed" / "cells" / "thor2-seed1" / "checkpoints"
    killed = converge(data, root / "work-killed", root / "out-killed", "--plan", "thor2:1",
                      kill_when=checkpoints / "checkpoint_*_10.pt")
    # before resuming it here, pack it for "the next session": a new machine with only what is committed
    packed = converge(data, root / "work-killed", root / "out-killed", "--plan", "thor2:1", "--pack")
    shutil.copytree(root / "out-killed", root / "out-carried")
    shutil.copytree(root / "out-killed" / "carry", root / "carry-as-packed")
    shutil.copy(checkpoints / "checkpoint_last.pt", root / "last-as-packed.pt")
    resumed = converge(data, root / "work-killed", root / "out-killed", "--plan", "thor2:1", "--threads", 2)
    carried = converge(data, root / "work-carried", root / "out-carried", "--plan", "thor2:1")
    return {"root": root, "data": data, "cost": cost, "whole": whole, "killed": killed, "resumed": resumed,
            "packed": packed, "carried": carried}


def test_measure_cost_times_every_planned_model_round_by_round(study):
    code, output = study["cost"]
    assert code == 0, output[-3000:]
    cost = json.loads((study["root"] / "out" / "cost.json").read_text())
    assert set(cost["s_per_update"]) == {"dense", "thor2"} and cost["threads"] == 1
    for name, rounds in cost["rounds"].items():
        assert len(rounds) == 2 and all(r > 0 for r in rounds)
        assert cost["s_per_update"][name] == pytest.approx(sum(rounds) / 2)  # the median of two
    logs = sorted((study["root"] / "work" / "cost").glob("cost-*.log"), key=os.path.getmtime)
    assert [p.name for p in logs] == ["cost-dense-round1.log", "cost-thor2-round1.log",
                                      "cost-dense-round2.log", "cost-thor2-round2.log"]  # interleaved
    assert "round 2/2 thor2:" in output and "wrote" in output
    assert not list((study["root"] / "work" / "cost").glob("**/*.pt"))  # timed runs save nothing


def test_equal_time_uses_the_calibrated_cost_of_both_models(study):
    root = study["root"]
    costs = json.loads((root / "out" / "cost.json").read_text())["s_per_update"]
    dense, thor = cell_of(root / "out", "dense-seed1.json"), cell_of(root / "out")
    budget = thor["equal_time"]
    assert budget["dense_updates"] == dense["best"]["updates"] and budget["from"] == "dense seed 1"
    assert budget["budget_updates"] == int(dense["best"]["updates"] * costs["dense"] / costs["thor2"])
    within = [p for p in thor["curve"] if p["updates"] <= budget["budget_updates"]]
    if not within:  # the toy's timings decide; under load thor2 may cost > 2x dense per update
        assert budget["missing"] == f"no checkpoint within {budget['budget_updates']} updates"
        return
    assert "bleu" in budget and budget["updates"] <= budget["budget_updates"]
    assert budget["valid_bleu"] == max(p["bleu"] for p in within)
    result = json.loads((root / "out" / "convergence.json").read_text())
    assert result["models"]["thor2"]["equal_time"]["cost_s"]["mean"] == pytest.approx(
        budget["updates"] * costs["thor2"], abs=1e-3)  # stats round to 3 decimals


def test_patience_stops_the_run_before_its_cap(study):
    code, output = study["whole"]
    assert code == 0, output[-3000:]
    for name in ("dense-seed1.json", "thor2-seed1.json"):
        cell = cell_of(study["root"] / "out", name)
        assert cell["status"] == "ok" and cell["stopped_by"] == "patience", cell.get("error")
        assert cell["updates"] < CAP and cell["updates"] % 5 == 0
        bleus = [p["bleu"] for p in cell["curve"]]
        best = max(range(len(bleus)), key=lambda i: (bleus[i], -i))
        assert len(bleus) - 1 - best == 2  # stopped exactly --patience validations after the best
        assert cell["best"]["updates"] == cell["curve"][best]["updates"]
        assert cell["best"]["valid_bleu"] == bleus[best] and cell["best"]["sentences"] > 0
        assert [p["updates"] for p in cell["curve"]] == list(range(5, cell["updates"] + 1, 5))
        assert all(isinstance(p["train_s"], float) for p in cell["curve"])
    dense_updates = cell_of(study["root"] / "out", "dense-seed1.json")["updates"]
    threads = json.loads((study["root"] / "out" / "cost.json").read_text())["threads"]
    assert "[1/2] done dense seed 1 (this attempt " in output
    starts = [line for line in output.splitlines() if "] start " in line]
    assert starts[0].endswith("ETA after the first cell; 2 cells to run)")
    assert starts[1].startswith("[2/2] start thor2 seed 1 at ") and starts[1].endswith(
        f"at the calibrated speed (--threads {threads} on idle cores, ~{dense_updates:,} updates a cell))"), starts


def test_an_interrupted_cell_resumes_and_ends_like_an_uninterrupted_one(study):
    code, output = study["killed"]
    assert code == -signal.SIGKILL, output[-3000:]
    code, output = study["resumed"]
    assert code == 0, output[-3000:]
    assert "thor2 seed 1: resuming from" in output and "checkpoint_last.pt" in output
    whole, resumed = cell_of(study["root"] / "out"), cell_of(study["root"] / "out-killed")
    assert [a["resumed_from"] for a in resumed["attempts"]][0] == 0
    assert len(resumed["attempts"]) == 2 and resumed["attempts"][1]["resumed_from"] in (5, 10)
    assert [a["threads"] for a in resumed["attempts"]] == [1, 2]  # other threads: still a resume
    assert resumed["updates"] == whole["updates"] and resumed["stopped_by"] == whole["stopped_by"]
    # the same training: every validation identical (loss to the printed digit, BLEU)
    assert [(p["updates"], p["loss"], p["bleu"]) for p in resumed["curve"]] == \
           [(p["updates"], p["loss"], p["bleu"]) for p in whole["curve"]]
    assert resumed["best"]["bleu"] == whole["best"]["bleu"]


def test_a_cell_carried_to_a_new_session_trains_on_exactly_as_if_never_stopped(study):
    """A new session has only what is committed: the packed carry, no work folder."""
    root = study["root"]
    code, output = study["packed"]
    assert code == 0 and "packed 1 cell(s) into " in output, output[-3000:]
    meta = json.loads((root / "carry-as-packed" / "thor2-seed1" / "carry.json").read_text())
    assert meta["update"] in (5, 10) and meta["checkpoints"]["checkpoint_last.pt"]["optimizer"]
    code, output = study["carried"]
    assert code == 0, output[-3000:]
    assert "thor2 seed 1: restored from the carry " in output and "resuming from " in output
    whole, carried = cell_of(root / "out"), cell_of(root / "out-carried")
    assert [(p["updates"], p["loss"], p["bleu"]) for p in carried["curve"]] == \
           [(p["updates"], p["loss"], p["bleu"]) for p in whole["curve"]]
    assert carried["updates"] == whole["updates"] and carried["stopped_by"] == whole["stopped_by"]
    assert carried["best"]["bleu"] == whole["best"]["bleu"] and carried["best"]["updates"] == whole["best"]["updates"]
    assert carried["averaged"]["bleu"] == whole["averaged"]["bleu"]
    assert [a["resumed_from"] for a in carried["attempts"]] == [0, meta["update"]]  # the carried log is the first
    assert [c["update"] for c in carried["carried"]] == [meta["update"]]
    assert carried["carried"][0]["packed_at"] == meta["packed_at"]


def test_the_report_shows_a_carried_cell_in_progress_without_its_work_folder(study, tmp_path):
    import quality_cells

    out = tmp_path / "out"
    shutil.copytree(study["root"] / "carry-as-packed", out / "carry")
    (out / "carry" / "thor2-seed1.packing-x").mkdir()  # a pack's staging folder is not a cell
    meta = json.loads((out / "carry" / "thor2-seed1" / "carry.json").read_text())
    settings = cell_of(study["root"] / "out", "dense-seed1.json")["settings"]
    result = convergence_report.build(str(out), list(quality_cells.MODELS), settings, str(tmp_path / "no-work"))
    (row,) = result["in_progress"]
    assert (row["model"], row["seed"], row["attempts"]) == ("thor2", 1, 1)
    assert row["updates"] >= meta["update"]  # the log may run past the packed checkpoint
    # a work folder that has trained further wins over the carry
    work = tmp_path / "work" / "cells" / "thor2-seed1"
    work.mkdir(parents=True)
    for log in (study["root"] / "work" / "cells" / "thor2-seed1").glob("train-*.log"):
        shutil.copy(log, work)
    result = convergence_report.build(str(out), list(quality_cells.MODELS), settings, str(tmp_path / "work"))
    assert result["in_progress"][0]["updates"] == cell_of(study["root"] / "out")["updates"]


def test_a_carry_holds_checkpoint_last_whole_in_shards(study, tmp_path):
    root = study["root"]
    folder = root / "carry-as-packed" / "thor2-seed1"
    meta = json.loads((folder / "carry.json").read_text())
    assert meta["shards"] and all((folder / s).stat().st_size <= convergence_carry.SHARD_BYTES for s in meta["shards"])
    convergence_carry.restore(str(folder), str(tmp_path / "cell"), study["data"])
    load = lambda p: torch.load(p, map_location="cpu", weights_only=False)  # noqa: E731 (test's own files)
    original, restored = load(root / "last-as-packed.pt"), load(tmp_path / "cell" / "checkpoints" / "checkpoint_last.pt")

    def same(a, b, where="checkpoint"):
        assert type(a) is type(b), where
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), where
        elif isinstance(a, np.ndarray):  # fairseq's BLEU counts in the saved meters
            assert a.dtype == b.dtype and np.array_equal(a, b), where
        elif isinstance(a, dict):
            assert list(a) == list(b), where
            for k in a:
                same(a[k], b[k], f"{where}/{k}")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{where}/{i}")
        else:
            assert a == b, where

    same(original, restored)  # weights, Adam's moments, the schedule, the data position, the patience counter
    assert original["last_optimizer_state"]["state"]  # there were moments to compare
    for name, entry in meta["checkpoints"].items():  # the update checkpoints it carries, weights only
        if name != "checkpoint_last.pt" and "copy_of" not in entry:
            assert "last_optimizer_state" not in load(tmp_path / "cell" / "checkpoints" / name)
    logs = sorted(p.name for p in (tmp_path / "cell").glob("train-*.log"))
    assert logs == ["train-1.log"] and (tmp_path / "cell" / "recipe.json").exists()
    assert not list(tmp_path.glob("*.restoring"))


def test_a_carry_for_another_dictionary_or_recipe_is_not_restored(study, tmp_path, capsys):
    folder = study["root"] / "carry-as-packed" / "thor2-seed1"
    other = tmp_path / "data"
    shutil.copytree(study["data"], other)
    dictionary = next(other.glob("dict.*.txt"))
    dictionary.write_text(dictionary.read_text() + "extra 1\n")
    with pytest.raises(RuntimeError, match="was packed for another dictionary"):
        convergence_carry.restore(str(folder), str(tmp_path / "cell"), str(other))
    assert not (tmp_path / "cell").exists()
    args = argparse.Namespace(out=str(tmp_path / "out"), work=str(tmp_path / "w"), data=study["data"])
    shutil.copytree(study["root"] / "carry-as-packed", tmp_path / "out" / "carry")
    recipe = json.loads((folder / "carry.json").read_text())["recipe"]
    convergence_cells.restore_carried(args, "thor2", 1, {**recipe, "average": 99})
    assert "not restoring " in capsys.readouterr().out and not (tmp_path / "w").exists()
    convergence_cells.restore_carried(args, "thor2", 1, recipe)
    last = tmp_path / "w" / "cells" / "thor2-seed1" / "checkpoints" / "checkpoint_last.pt"
    assert last.exists() and "restored from the carry" in capsys.readouterr().out
    before = last.stat().st_mtime_ns
    convergence_cells.restore_carried(args, "thor2", 1, recipe)  # the folder is as far: left as it is
    assert capsys.readouterr().out == "" and last.stat().st_mtime_ns == before


def test_carry_shards_write_a_shared_storage_once_and_stay_under_their_size(monkeypatch):
    monkeypatch.setattr(convergence_carry, "SHARD_BYTES", 1000)
    embed = torch.randn(100)  # 400 bytes, shared by two keys as fairseq's tied embeddings are
    big = torch.randn(1000)
    tensors = {"a": torch.randn(100), "embed": embed, "b": torch.randn(100), "proj": embed,
               "view": big[10:20], "c": torch.randn(100)}
    shards = convergence_carry._shards(tensors)
    assert [list(s) for s in shards] == [["a", "embed", "proj"], ["b", "view", "c"]]
    assert shards[1]["view"].untyped_storage().nbytes() == 40  # not the 4,000-byte storage it was cut from
    for shard in shards:
        distinct = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in shard.values()}
        assert sum(distinct.values()) <= 1000


def test_a_training_packs_itself_periodically_and_a_failed_pack_does_not_stop_it(capsys):
    calls = []

    def action():
        calls.append(time.time())
        if len(calls) == 2:
            raise OSError("disk full")

    with convergence_cells.periodically(0.05, action):
        time.sleep(0.5)
    stopped = len(calls)
    time.sleep(0.2)
    assert stopped >= 3 and len(calls) == stopped  # went on after the failure, stopped with the block
    assert "packing for the next session failed: OSError: disk full" in capsys.readouterr().out
    with convergence_cells.periodically(0, action):  # --pack-every 0: never
        time.sleep(0.1)
    assert len(calls) == stopped


def test_a_carry_keeps_the_checkpoints_scoring_may_still_need():
    curve = [{"updates": u, "bleu": b} for u, b in
             [(250, 10.0), (500, 20.0), (750, 19.0), (1000, 21.0), (1250, 20.5), (1500, 20.9), (1750, 20.0)]]
    saved = {p["updates"]: f"checkpoint_1_{p['updates']}.pt" for p in curve}
    need = lambda **kw: convergence_cells.checkpoints_scoring_may_need(  # noqa: E731
        curve, saved, **{"trained": False, "patience": 3, "average": 2, "save_every": 250, "budget_updates": None, **kw})
    # best at 1000; a stop 3 validations later (1750) averages 1500 and 1750: both already saved
    assert need() == {1000: "best so far", 1500: "may be averaged", 1750: "may be averaged"}
    assert need(patience=8) == {1000: "best so far"}  # the averaged ones all lie after the resume
    assert need(budget_updates=800) == {500: "best within the equal-time budget", 1000: "best so far",
                                        1500: "may be averaged", 1750: "may be averaged"}
    assert need(trained=True, average=3) == {1000: "best so far", 1250: "may be averaged",
                                             1500: "may be averaged", 1750: "may be averaged"}
    assert convergence_cells.checkpoints_scoring_may_need([], {}, False, 3, 2, 250, None) == {}


def test_the_averaged_checkpoint_is_the_mean_of_the_last_files(study):
    cell = cell_of(study["root"] / "out")
    save_dir = study["root"] / "work" / "cells" / "thor2-seed1" / "checkpoints"
    saved = convergence_cells.update_checkpoints(str(save_dir))
    assert cell["averaged"]["checkpoints"] == sorted(saved)[-2:] and len(saved) > 2
    load = lambda p: torch.load(p, map_location="cpu", weights_only=True)["model"]  # noqa: E731
    inputs = [load(saved[u]) for u in cell["averaged"]["checkpoints"]]
    average = load(save_dir / "average-last2.pt")
    assert average.keys() == inputs[0].keys()
    for name, tensor in average.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, (inputs[0][name].double() + inputs[1][name].double()).div(2).float())
    older = load(saved[sorted(saved)[-3]])
    floats = [n for n in average if average[n].is_floating_point()]
    assert any(not torch.equal(average[n], (older[n] + inputs[1][n]) / 2) for n in floats)


def test_a_finished_cell_is_skipped_and_another_recipe_retrains(study):
    root = study["root"]
    code, output = converge(study["data"], root / "work", root / "out", "--plan", "dense:1")
    assert code == 0 and "skip dense seed 1: finished" in output, output[-2000:]
    result = json.loads((root / "out" / "convergence.json").read_text())
    assert set(result["models"]) == {"dense", "thor2"} and not result["other_recipe"]


def test_a_cell_another_process_holds_is_left_to_it(study):
    root = study["root"]
    with cell_claim.try_claim(str(root / "work"), "thor2-seed1") as claim:
        assert claim is not None
        code, output = converge(study["data"], root / "work", root / "out", "--plan", "dense:1,thor2:1")
    assert code == 0, output[-2000:]
    assert "[1/2] skip dense seed 1: finished" in output
    assert f"[2/2] skip thor2 seed 1: another process is training it (pid {os.getpid()} on " in output
    assert "not run here, another process holds them: thor2 seed 1 (that process reports them)" in output
    assert cell_claim.try_claim(str(root / "work"), "thor2-seed1") is not None  # released with the block


def test_the_same_plan_started_twice_trains_each_cell_once(tmp_path, study):
    """The README's way to use both cores: the same command twice, --threads 1 each."""
    runs = [start(study["data"], tmp_path / "work", tmp_path / "out", "--plan", "dense:1,thor2:1")
            for _ in range(2)]
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    both = "\n".join(outputs)
    for model in ("dense", "thor2"):
        assert both.count(f"start {model} seed 1 at ") == 1, both[-4000:]
        assert cell_of(tmp_path / "out", f"{model}-seed1.json")["status"] == "ok"
        assert len(glob.glob(str(tmp_path / "work" / "cells" / f"{model}-seed1" / "train-*.log"))) == 1
    assert json.loads((tmp_path / "out" / "convergence.json").read_text())["models"].keys() == {"dense", "thor2"}
    assert not glob.glob(str(tmp_path / "out" / "**" / ".*tmp*"), recursive=True)  # no half-written leftovers


def test_the_report_shows_unfinished_cells_beside_dense_and_only_those(study, tmp_path):
    import shutil

    import quality_cells

    root, out, work = study["root"], tmp_path / "out", tmp_path / "work"
    (out / "cells").mkdir(parents=True)
    for name in ("cells/dense-seed1.json", "cost.json"):  # dense finished, thor2 not yet
        shutil.copy(root / "out" / name, out / name)
    for cell in ("dense-seed1", "thor2-seed1"):
        (work / "cells" / cell).mkdir(parents=True)
        for log in glob.glob(str(root / "work" / "cells" / cell / "train-*.log")):
            shutil.copy(log, work / "cells" / cell)
    dense, thor2 = cell_of(root / "out", "dense-seed1.json"), cell_of(root / "out")
    result = convergence_report.build(str(out), list(quality_cells.MODELS), dense["settings"], str(work))
    (row,) = result["in_progress"]  # dense's folder is finished: not listed
    assert (row["model"], row["seed"], row["attempts"]) == ("thor2", 1, 1)
    assert row["latest"] == {"updates": thor2["curve"][-1]["updates"], "bleu": thor2["curve"][-1]["bleu"]}
    assert row["best"]["bleu"] == max(p["bleu"] for p in thor2["curve"])
    dense_before = [p["bleu"] for p in dense["curve"] if p["updates"] <= row["latest"]["updates"]]
    assert row["dense_same_updates"] == round(dense_before[-1], 2)
    costs = json.loads((out / "cost.json").read_text())["s_per_update"]
    assert row["calibrated_s"] == round(row["latest"]["updates"] * costs["thor2"])
    budget = row["latest"]["updates"] * costs["thor2"] / costs["dense"]
    dense_by_then = [p["bleu"] for p in dense["curve"] if p["updates"] <= budget]
    assert row["dense_same_time"] == (round(dense_by_then[-1], 2) if dense_by_then else None)
    report = (out / "convergence.md").read_text()
    assert "## In progress (not results)" in report and "| thor2 | 1 | " in report
    assert "In progress" not in convergence_report.markdown(
        convergence_report.build(str(out), list(quality_cells.MODELS), dense["settings"]))  # no work folder


def test_a_cell_without_a_budget_keeps_its_checkpoints_and_is_rescored_once_there_is_one(study):
    root = study["root"]
    killed = cell_of(root / "out-killed")  # trained alone: no dense cell gave it a time budget
    assert killed["equal_time"] == {"missing": "no finished dense cell to take the time budget from"}
    assert (root / "work-killed" / "cells" / "thor2-seed1" / "trained.json").exists()
    code, output = converge(study["data"], root / "work-killed", root / "out-killed", "--plan", "thor2:1")
    assert code == 0 and "skip thor2 seed 1: finished" in output, output[-2000:]  # still no budget: not decoded again
    for name in ("cells/dense-seed1.json", "cost.json"):
        (root / "out-killed" / name).write_text((root / "out" / name).read_text())
    code, output = converge(study["data"], root / "work-killed", root / "out-killed", "--plan", "thor2:1")
    assert code == 0 and "rescore thor2 seed 1: its equal-time view was missing" in output, output[-2000:]
    assert "training had finished; scoring its checkpoints" in output
    rescored = cell_of(root / "out-killed")
    timed = rescored["equal_time"]  # scored now: a budget from dense seed 1 and the copied calibration
    assert timed["from"] == "dense seed 1" and timed["budget_updates"] >= 0
    assert "bleu" in timed or timed["missing"] == f"no checkpoint within {timed['budget_updates']} updates"
    # scored: only the checkpoints its views were decoded from stay, and no checkpoint_last.pt to resume
    views = [rescored[v] for v in ("best", "averaged", "equal_time") if "checkpoint" in rescored[v]]
    kept = root / "work-killed" / "cells" / "thor2-seed1" / "checkpoints"
    assert sorted(os.listdir(kept)) == sorted({v["checkpoint"] for v in views})
    assert "average-last2.pt" in os.listdir(kept) and "checkpoint_last.pt" not in os.listdir(kept)
    assert "thor2 seed 1: kept its scored checkpoints (" in output


def test_each_scored_view_commits_its_translations_and_they_give_its_score(study):
    import sacrebleu

    out = study["root"] / "out"
    lines = lambda path: path.read_text(encoding="utf-8").split("\n")[:-1]  # noqa: E731 (one per sentence)
    references = lines(out / "translations" / "references.txt")
    for name in ("dense-seed1.json", "thor2-seed1.json"):
        cell = cell_of(out, name)
        for view in ("best", "averaged"):
            scored = cell[view]
            assert scored["translations"] == f"translations/{name[:-5]}.{view}.txt"
            hypotheses = lines(out / scored["translations"])
            assert len(hypotheses) == len(references) == scored["sentences"]
            assert round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2) == scored["bleu"]
            assert scored["references_sha1"] == paired_significance.lines_sha1(references)
    report = (out / "convergence.md").read_text()  # both cells have translations: a paired row
    assert "## Paired bootstrap on the test sentences" in report and "| thor2 - dense | best | 1 vs 1 | " in report


def test_paired_bootstrap_pairs_cells_scored_against_the_same_references(tmp_path):
    import sacrebleu

    references = [f"the {w} sat on mat number {i}" for i, w in enumerate(["cat", "dog", "fox", "owl"] * 25)]
    perfect, poor = references, [r.replace("sat on", "is under") for r in references]
    folder = tmp_path / "translations"
    folder.mkdir()
    (folder / "references.txt").write_text("".join(r + "\n" for r in references))
    sha1 = paired_significance.lines_sha1(references)

    def cell(model, seed, lines, references_sha1=sha1):
        (folder / f"{model}-seed{seed}.best.txt").write_text("".join(x + "\n" for x in lines))
        view = {"translations": f"translations/{model}-seed{seed}.best.txt", "references_sha1": references_sha1}
        return {"model": model, "seed": seed, "best": view, "equal_time": view}

    cells = [cell("thor2", 1, perfect), cell("dense", 2, poor), {"model": "dense", "seed": 1, "best": {"bleu": 1}},
             cell("hash", 1, poor, references_sha1="another corpus")]
    result = paired_significance.tests(str(tmp_path), cells, [("thor2", "dense"), ("thor2", "hash")],
                                       {"dense": ["best", "equal_time"], "hash": ["best"]})
    assert [(r["difference"], r["view"], r["seeds"]) for r in result["rows"]] == [
        ("thor2 - dense", "best", [1, 2]), ("thor2 - dense", "equal_time", [1, 2])]
    row = result["rows"][0]
    expected = sacrebleu.corpus_bleu(perfect, [references]).score - sacrebleu.corpus_bleu(poor, [references]).score
    assert row["delta"] == round(expected, 2) and row["bleu"][0] == 100.0
    assert row["p"] < 0.01  # every sentence better: no resample reverses it
    assert result["without_translations"] == ["dense seed 1", "hash seed 1"]
    # as good as each other, better on different sentences: nothing for the test to find
    one, other = list(poor), list(poor)
    one[:2], other[2:4] = references[:2], references[2:4]
    tie = paired_significance.tests(str(tmp_path), [cell("thor2", 1, one), cell("dense", 2, other)],
                                    [("thor2", "dense")], {"dense": ["best"]})["rows"][0]
    assert tie["delta"] == 0 and tie["p"] > 0.2


def test_cost_calibration_of_another_recipe_is_refused(tmp_path):
    from training_cost import load, write

    settings = {"layers": 3, "embed_dim": 256, "dropout": 0.3, "data": "/here", "patience": 8}
    write(str(tmp_path), {"s_per_update": {"dense": 0.5}}, settings)
    assert load(str(tmp_path), {**settings, "data": "/elsewhere", "patience": 4}) == ({"dense": 0.5}, None)
    costs, why = load(str(tmp_path), {**settings, "dropout": 0.1})
    assert costs is None and "another recipe (differs in dropout)" in why and "--measure-cost" in why
    costs, why = load(str(tmp_path / "none"), settings)
    assert costs is None and "no cost calibration" in why


def test_seconds_per_update_skips_the_warm_updates():
    from training_cost import seconds_per_update

    log = "\n".join(f"x | train_inner | epoch 001: num_updates={u}, ups={ups}, train_wall=1" for u, ups in
                     ((3, 0.1), (6, 2), (9, 1), (12, 0.5)))
    assert seconds_per_update(log, 3) == pytest.approx((1.5 + 3 + 6) / 9)
    assert seconds_per_update(log, 6) == pytest.approx((3 + 6) / 6)
    with pytest.raises(RuntimeError, match="no timed interval after update 12"):
        seconds_per_update(log, 12)


def test_a_work_folder_recorded_with_threads_resumes(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "checkpoint_last.pt").write_bytes(b"x")
    (tmp_path / "recipe.json").write_text(json.dumps({"train_flags": ["--a", "1"], "threads": 1, "average": 5}))
    assert convergence_cells.prepare_work(str(tmp_path), {"train_flags": ["--a", "1"], "average": 5})
    assert capsys.readouterr().out == ""
    assert convergence_cells.prepare_work(str(tmp_path), {"train_flags": ["--a", "2"], "average": 5}) is False
    assert not (tmp_path / "checkpoints" / "checkpoint_last.pt").exists()  # another recipe starts afresh
    assert "trained with another recipe (--a 1 -> 2); clearing it" in capsys.readouterr().out


def cell(model, seed, bleu, dropout=0.3, seconds=100.0, valid_bleu=None):
    view = {"bleu": bleu, "chrf": 2 * bleu, "updates": 10, "train_s": seconds}
    return {"model": model, "seed": seed, "status": "ok", "mode": "converge", "two_pass": model != "dense",
            "settings": {"dropout": dropout, "data": f"/machine{seed}/data", "threads": seed},
            "best": dict(view, valid_bleu=bleu if valid_bleu is None else valid_bleu), "averaged": view,
            "equal_time": view, "updates": 20, "train_s": seconds, "stopped_by": "patience",
            "train_words_per_s": 1.0, "total_params": 10, "active_params": 5, "curve": [], "host": {"cpu": "x"}}


def test_a_cell_of_another_recipe_is_not_pooled_into_a_row():
    cells = [cell("dense", 1, 30.0), cell("dense", 2, 31.0), cell("dense", 3, 99.0, dropout=0.1),
             cell("thor2", 1, 33.0), cell("thor2", 2, 34.0)]
    result = convergence_report.summarize(cells, ["dense", "thor2"], {"dropout": 0.3, "data": "here", "threads": 1})
    assert result["models"]["dense"]["seeds"] == [1, 2]  # paths and threads are not the recipe
    assert result["models"]["dense"]["best"]["bleu"]["mean"] == 30.5
    assert result["other_recipe"] == [{"model": "dense", "seed": 3, "differs_in": ["dropout"]}]
    assert "`dense` seed 3: differs in dropout" in convergence_report.markdown(result)
    target = result["targets"][0]
    assert target["rows"] == "thor2 - dense" and target["delta"] == 3.0
    assert target["status"] == "met" and target["beyond_spread"]  # 3.0 > 0.707 + 0.707
    assert result["models"]["thor2"]["best"]["cost_s"]["n"] == 0 and "not measured" in convergence_report.markdown(
        result)
    costed = convergence_report.summarize(cells, ["dense", "thor2"], {"dropout": 0.3}, {"dense": 0.5, "thor2": 1.25})
    assert costed["models"]["dense"]["best"]["cost_s"]["mean"] == 5.0  # 10 updates x 0.5 s
    assert costed["models"]["thor2"]["equal_time"]["cost_s"]["mean"] == 12.5
    assert "dense 0.500, thor2 1.250 s/update" in convergence_report.markdown(costed)


def test_a_started_cell_goes_before_the_plans_new_ones(tmp_path, capsys):
    import quality

    args = quality.parse_args(["--converge", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    started = tmp_path / "work" / "cells" / "dense-seed2"
    started.mkdir(parents=True)
    (started / "train-1.log").write_text("2026-12-07 07:45:22 | INFO | train_inner | epoch 001:    250 / 282 "
                                         "loss=9.564, num_updates=250, train_wall=240\n")
    finished = tmp_path / "work" / "cells" / "dense-seed1"  # keeps its logs, but is done
    finished.mkdir(parents=True)
    (finished / "train-1.log").write_text((started / "train-1.log").read_text())
    (tmp_path / "out" / "cells").mkdir(parents=True)
    (tmp_path / "out" / "cells" / "dense-seed1.json").write_text(json.dumps({"status": "ok"}))
    ordered = quality.started_first(args, args.cells)
    assert ordered[0] == ("dense", 2) and sorted(ordered) == sorted(args.cells)
    assert ordered[1:] == [c for c in args.cells if c != ("dense", 2)]  # the plan's order otherwise
    assert "resuming first: dense seed 2 (250 updates)" in capsys.readouterr().out
    assert quality.started_first(args, ordered) == ordered


def test_the_r_drop_target_uses_the_plans_rdropf_row_or_fairseqs_when_alone():
    def r_drop_target(*cells):
        order = ["dense", "rdrop", "thor2", "rdropf"]
        return convergence_report.summarize(list(cells), order, {"dropout": 0.3})["targets"][1]

    thor2 = cell("thor2", 1, 33.0)
    assert r_drop_target(thor2, cell("rdropf", 1, 32.0), cell("rdrop", 1, 34.0))["rows"] == "thor2 - rdropf"
    only_fairseqs = r_drop_target(thor2, cell("rdrop", 1, 34.0))
    assert only_fairseqs["rows"] == "thor2 - rdrop" and only_fairseqs["status"] == "missed"
    assert r_drop_target(thor2)["status"] == "not measured yet"


def test_the_best_thor_setting_is_chosen_on_validation_not_test():
    cells = [cell("dense", 1, 30.0), cell("dense", 2, 30.2),
             cell("thor2", 1, 33.0, valid_bleu=40.0), cell("thor2", 2, 33.2, valid_bleu=40.4),
             cell("thor4", 1, 34.0, valid_bleu=39.0)]  # higher on test, lower on validation
    result = convergence_report.summarize(cells, ["dense", "thor2", "thor4"], {"dropout": 0.3})
    assert convergence_report.best_thor(result["models"]) == "thor2"
    assert result["targets"][0]["rows"] == "thor2 - dense"
    assert "chosen on validation" in convergence_report.markdown(result) and ": thor2." in convergence_report.markdown(
        result)


def test_equal_time_takes_the_best_validation_within_the_budget():
    curve = [{"updates": u, "train_s": float(u), "bleu": b} for u, b in ((10, 5.0), (20, 9.0), (30, 8.0), (40, 12.0))]
    saved = {10: "a", 20: "b", 30: "c", 40: "d"}
    assert convergence_cells.best_within(curve, 35, saved)["updates"] == 20
    assert convergence_cells.best_within(curve, 40, saved)["updates"] == 40
    assert convergence_cells.best_within(curve, 35, {10: "a", 30: "c"})["updates"] == 30  # only saved ones
    assert convergence_cells.best_within(curve, 5, saved) is None


def test_training_time_counts_redone_updates_once():
    first = "\n".join(f"x | train_inner | epoch 001: num_updates={u}, wpb=100, train_wall=10" for u in (5, 10, 15))
    second = ("x | fairseq.trainer | Loaded checkpoint ck/checkpoint_last.pt (epoch 2 @ 10 updates)\n" +
              "\n".join(f"x | train_inner | epoch 002: num_updates={u}, wpb=100, train_wall=12" for u in (15, 20)))
    assert convergence_cells.seconds_across_attempts([first, second]) == {5: 10.0, 10: 20.0, 15: 32.0, 20: 44.0}
    assert convergence_cells.words_per_second([first, second]) == round(2000 / 44, 1)
    # an attempt stopped (or seen) before fairseq loaded its checkpoint trained nothing: it erases nothing
    starting = "x | fairseq_cli.train | task: translation_thor\nx | fairseq_cli.train | model: thor_transformer"
    assert convergence_cells.resumed_at(starting) is None
    assert convergence_cells.seconds_across_attempts([first, starting]) == {5: 10.0, 10: 20.0, 15: 30.0}
    assert convergence_cells.seconds_across_attempts([first, starting, second]) == {5: 10.0, 10: 20.0, 15: 32.0,
                                                                                    20: 44.0}


def test_measure_cost_options_are_checked_by_name(capsys):
    import quality

    with pytest.raises(SystemExit):
        quality.parse_args(["--converge", "--measure-cost", "--cost-timed", "10", "--report-only"])
    assert capsys.readouterr().err.strip() == (
        "quality.py: error: --cost-timed 10 must be a positive multiple of 3 (it is logged in thirds)")
    with pytest.raises(SystemExit):
        quality.parse_args(["--measure-cost"])
    assert "--measure-cost, --pack and --pack-every belong to --converge" in capsys.readouterr().err
    for alone in (["--pack"], ["--pack-every", "5"]):
        with pytest.raises(SystemExit):
            quality.parse_args(alone)
        assert "--pack and --pack-every belong to --converge" in capsys.readouterr().err
    assert quality.parse_args(["--converge", "--report-only"]).pack_every == 30
    with pytest.raises(SystemExit):
        quality.parse_args(["--converge", "--pack-every", "-1", "--report-only"])
    assert "--pack-every -1.0: minutes between packs, at least 0 (0: never)" in capsys.readouterr().err


def test_the_eta_counts_what_is_left_to_train_at_the_calibrated_cost(tmp_path):
    import quality
    import training_cost

    args = quality.parse_args(["--converge", "--plan", "dense:1,thor2:2",
                               "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    todo = [("thor2", 1), ("thor2", 2)]
    assert quality.eta(args, todo) == "ETA after the first cell; 2 cells to run"
    (tmp_path / "out" / "cells").mkdir(parents=True)
    (tmp_path / "out" / "cells" / "dense-seed1.json").write_text(json.dumps(
        {"model": "dense", "seed": 1, "status": "ok", "mode": "converge", "updates": 20000}))
    assert quality.eta(args, todo).startswith("ETA unknown: no cost calibration (")
    settings = quality.settings(args)
    training_cost.write(str(tmp_path / "out"), {"s_per_update": {"dense": 0.5, "thor2": 1.2}, "threads": 2}, settings)
    # thor2 seed 1 was killed after 5,000 updates, then resumed and killed again at 7,500
    work = tmp_path / "work" / "cells" / "thor2-seed1"
    work.mkdir(parents=True)
    (work / "train-1.log").write_text("\n".join(
        f"x | train_inner | epoch 001: num_updates={u}, train_wall=10" for u in (2500, 5000)))
    (work / "train-2.log").write_text(
        "x | fairseq.trainer | Loaded checkpoint c/checkpoint_last.pt (epoch 2 @ 5000 updates)\n"
        "x | train_inner | epoch 002: num_updates=7500, train_wall=10")
    seconds = ((20000 - 7500) + 20000) * 1.2 * convergence_cells.VALIDATION_SHARE
    assert quality.eta(args, todo) == (f"ETA {quality.hms(seconds)} for 2 cells at the calibrated speed "
                                       "(--threads 2 on idle cores, ~20,000 updates a cell)")
    assert quality.eta(args, [("hash", 1)]).startswith("ETA unknown: cost.json has no seconds per update for hash;")
