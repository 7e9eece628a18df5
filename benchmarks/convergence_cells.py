"""One (model, seed) cell of ``benchmarks/quality.py --converge``: train until validation stops
improving, then score the best and the averaged checkpoint on test.

Training is the quality study's command (``quality_cells.train_command``) with what a long run
needs: validation BLEU every K updates (greedy, so validation stays cheap; test scores use beam 5),
``--best-checkpoint-metric bleu`` with fairseq's ``--patience`` (which the plugin carries across a
resume, ``fairseq_thor/early_stopping.py``), a ``--max-update`` cap, and the optimizer state in
every checkpoint so that an interrupted cell resumes from its own ``checkpoint_last.pt``.

A cell's work folder keeps ``recipe.json`` (what the checkpoints were trained with) and one log per
training attempt. Rerunning the study after an interruption resumes the cell when the recipe is
the same (and says from which update); a folder of another recipe is cleared and trained afresh.
Once training has ended, ``trained.json`` marks it, so an interruption while decoding does not
train again. Each attempt's ``train_wall`` counts from its resume point, so the cell's training
time at update u is the time of the attempt that reached u plus what earlier attempts took to reach
its resume point (updates redone after a kill count once).

Three checkpoints are decoded on test (beam 5, detokenized sacreBLEU, every sentence):

* best: ``checkpoint_best.pt``, the highest validation BLEU;
* averaged: the parameter average of the last N update checkpoints (``fairseq-thor-average``), as MT
  papers report;
* equal training time: the best validation BLEU among the checkpoints trained within the seconds
  the dense model of the same seed needed to reach its best checkpoint (the mean over finished
  dense cells when that seed's is missing). Dense's own equal-time checkpoint is its best. Time
  here is calibrated, not the cell's own ``train_wall``: updates x the model's seconds per update
  measured side by side (``training_cost.py``), because a cell's attempts run under whatever load
  and threads each sitting had. Only the ratio of two models' costs enters the budget.

Each view's test translations are written to ``OUT/translations/`` (committed, for paired
significance tests between models). A scored cell keeps only the checkpoints its views were
decoded from, for inference-mode rows, serving and export of a converged model.

A session keeps only what is committed, so a cell that outlasts one is carried to the next through
the repository (``convergence_carry.py``): ``--pack`` (and, while a cell trains, every
``--pack-every`` minutes) writes its resumable state to OUT/carry/, and the next session's run
restores the work folder from it before resuming.

Threads are not part of a cell's recipe: an attempt may resume with another ``--threads`` (one
beside other work, two on idle cores); each attempt's threads are recorded.
"""
import json
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager
from typing import Dict, List, Optional

import convergence_carry
import fairseq_logs
import quality_report
import training_cost
from cli_runs import BIN, USER_DIR, count_params, decode, run
from paired_significance import REFERENCES, TRANSLATIONS, lines_sha1, write_lines
from atomic_files import write_json
from quality_cells import (MODELS, cell_path, filled_and_written, read_cell, recipe, recipe_change, started_cell,
                           train_command)

VALID_BLEU_ARGS = '{"beam": 1, "max_len_a": 1.5, "max_len_b": 10}'  # greedy: validation stays cheap
RESUMED = re.compile(r"[Ll]oaded checkpoint .* \(epoch \d+ @ (\d+) updates\)")


def converge_command(args, name: str, seed: int, save_dir: str) -> list:
    """The quality study's training command, validating BLEU and stopping on ``--patience``."""
    cmd = train_command(args, name, seed, save_dir)
    cmd.remove("--no-save-optimizer-state")  # a resume needs the optimizer's moments
    return cmd + [str(a) for a in [
        "--eval-bleu", "--eval-bleu-args", VALID_BLEU_ARGS,
        *(["--eval-bleu-remove-bpe", args.remove_bpe] if args.remove_bpe != "none" else []),
        "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric", "--patience", args.patience,
    ]]


def converge_recipe(args, name: str, seed: int) -> dict:
    """``quality_cells.recipe`` with the convergence flags and the number of averaged checkpoints,
    without threads (an attempt may resume with other threads: they change speed, not the model)."""
    flags = ["USER_DIR" if t == USER_DIR else t for t in converge_command(args, name, seed, "SAVE_DIR")[1:]]
    return without_threads({**recipe(args, name, seed), "train_flags": flags, "average": args.average})


def without_threads(recorded: Optional[dict]) -> Optional[dict]:
    """A recipe as compared: cells and work folders recorded before threads left the recipe carry them."""
    return None if recorded is None else {k: v for k, v in recorded.items() if k != "threads"}


# ---- the training time of a run that may have been resumed -------------------------------------

def attempt_logs(work: str) -> List[str]:
    """The training logs of a cell's attempts, oldest first."""
    found = [(int(m.group(1)), name) for name in os.listdir(work)
             if (m := re.fullmatch(r"train-(\d+)\.log", name))]
    return [os.path.join(work, name) for _, name in sorted(found)]


def attempt_texts(work: str) -> List[str]:
    """What each attempt logged, oldest first (a byte cut by a kill is read as a replacement)."""
    texts = []
    for path in attempt_logs(work):
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return texts


def resumed_at(log: str) -> Optional[int]:
    """The update an attempt started from: the one fairseq says it loaded, 0 when it found no
    checkpoint (or trained without saying), None when it was stopped before loading anything: such
    an attempt trained nothing and must not erase what earlier attempts logged."""
    m = RESUMED.search(log)
    if m:
        return int(m.group(1))
    return 0 if "No existing checkpoint found" in log or " | train_inner | " in log else None


def progress_across_attempts(logs: List[str]) -> Dict[int, dict]:
    """The ``train_inner`` statistics of every logged update over resumed attempts: an attempt
    replaces what earlier ones logged after its resume point (those updates were redone)."""
    merged: Dict[int, dict] = {}
    for text in logs:
        start = resumed_at(text)
        if start is None:  # stopped while starting up (or starting now): nothing to merge yet
            continue
        merged = {u: stats for u, stats in merged.items() if u <= start}
        for line in text.splitlines():
            if " | train_inner | " in line:
                stats = fairseq_logs.comma_stats(line)
                if "num_updates" in stats:
                    merged[int(stats["num_updates"])] = stats
    return dict(sorted(merged.items()))


def seconds_across_attempts(logs: List[str]) -> Dict[int, float]:
    """Cumulative seconds inside training steps at each logged update: the running sum of each
    interval's ``train_wall`` (fairseq resets it after every line; a resumed attempt's first
    interval starts at its checkpoint)."""
    total, seconds = 0.0, {}
    for u, stats in progress_across_attempts(logs).items():
        total += stats.get("train_wall", 0.0)
        seconds[u] = total
    return seconds


def words_per_second(logs: List[str]) -> Optional[float]:
    """Target words trained on per second inside training steps, over all attempts."""
    words, wall, previous = 0.0, 0.0, 0
    for u, stats in progress_across_attempts(logs).items():
        words += stats.get("wpb", 0.0) * (u - previous)
        wall += stats.get("train_wall", 0.0)
        previous = u
    return round(words / wall, 1) if wall else None


def valid_curve(logs: List[str], seconds: Dict[int, float]) -> List[dict]:
    """Validation loss, nll_loss and BLEU at every validated update, with its training time."""
    points = {}
    for text in logs:  # a redone update's line replaces the one before the kill
        for line in text.splitlines():
            if "valid on 'valid' subset" in line:
                stats = fairseq_logs.pipe_stats(line, "valid on 'valid' subset")
                if "num_updates" in stats:
                    u = int(stats["num_updates"])
                    points[u] = {"updates": u, "train_s": seconds.get(u), "loss": stats.get("loss"),
                                 "nll_loss": stats.get("nll_loss"), "bleu": stats.get("bleu")}
    return [points[u] for u in sorted(points)]


def stop_reason(logs: List[str], updates: int, cap: int) -> str:
    if any("early stop since valid performance hasn't improved" in t or "stopped early" in t for t in logs):
        return "patience"
    return "max_update" if updates >= cap else "unknown"


# ---- choosing and scoring checkpoints ----------------------------------------------------------

def update_checkpoints(save_dir: str) -> Dict[int, str]:
    found = {}
    for name in os.listdir(save_dir):
        m = re.fullmatch(r"checkpoint_\d+_(\d+)\.pt", name)
        if m:
            found[int(m.group(1))] = os.path.join(save_dir, name)
    return found


def best_within(curve: List[dict], budget_updates: int, saved: Dict[int, str]) -> Optional[dict]:
    """The saved checkpoint with the highest validation BLEU among those at or before
    ``budget_updates`` (the earliest of equals), or None."""
    inside = [p for p in curve if p["updates"] <= budget_updates and p["bleu"] is not None and p["updates"] in saved]
    return max(inside, key=lambda p: (p["bleu"], -p["updates"])) if inside else None


def checkpoints_scoring_may_need(curve: List[dict], saved: Dict[int, str], trained: bool, patience: int,
                                 average: int, save_every: int, budget_updates: Optional[int]) -> Dict[int, str]:
    """The saved update checkpoints that scoring may still decode (update -> why), i.e. what a carry
    to the next session keeps: the best so far, the best within the equal-time budget, and those
    that may still be among the last ``average`` averaged -- the ones at least (patience - average +
    1) saves after the best, as a run stops ``patience`` validations after its best (all of the last
    ``average`` once training has ended). Every later checkpoint is written after the resume."""
    best = best_within(curve, max(saved, default=0), saved)
    if best is None:
        return {}
    why = {best["updates"]: "best so far"}
    within = best_within(curve, budget_updates, saved) if budget_updates is not None else None
    if within:
        why.setdefault(within["updates"], "best within the equal-time budget")
    averaged = (sorted(saved)[-average:] if trained else
                [u for u in saved if u >= best["updates"] + (patience - average + 1) * save_every])
    for u in averaged:
        why.setdefault(u, "may be averaged")
    return dict(sorted(why.items()))


def updates_to_best(cell: Optional[dict]) -> Optional[int]:
    return cell["best"]["updates"] if cell and cell.get("status") == "ok" else None


def dense_updates_to_best(args, seed: int) -> Optional[dict]:
    """Updates dense needed to reach its best checkpoint: same seed, else the mean of those done."""
    own = updates_to_best(read_cell(cell_path(args, "dense", seed)))
    if own is not None:
        return {"dense_updates": own, "from": f"dense seed {seed}"}
    done = {}
    cells_dir = os.path.join(args.out, "cells")
    for name in sorted(os.listdir(cells_dir)) if os.path.isdir(cells_dir) else []:
        m = re.fullmatch(r"dense-seed(\d+)\.json", name)
        updates = updates_to_best(read_cell(os.path.join(cells_dir, name))) if m else None
        if updates is not None:
            done[int(m.group(1))] = updates
    if not done:
        return None
    return {"dense_updates": sum(done.values()) / len(done), "from": f"mean of dense seeds {sorted(done)}"}


def equal_time_budget(args, name: str, seed: int, settings: dict) -> dict:
    """Dense's time to its best in calibrated seconds, and the updates of ``name`` that fit in it;
    or {"missing": why}."""
    dense = dense_updates_to_best(args, seed)
    if dense is None:
        return {"missing": "no finished dense cell to take the time budget from"}
    costs, why = training_cost.load(args.out, settings)
    if costs is None:
        return {"missing": why}
    if name not in costs or "dense" not in costs:
        return {"missing": f"{training_cost.COST_FILE} has no seconds per update for {name} or dense; "
                           "run benchmarks/quality.py --converge --measure-cost with both in --plan"}
    budget_s = dense["dense_updates"] * costs["dense"]
    return {**dense, "budget_s": round(budget_s, 1), "s_per_update": costs[name],
            "budget_updates": int(budget_s / costs[name])}


def scored(args, name: str, checkpoint: str, point: dict, work: str, tag: str, env: dict) -> dict:
    """Decode ``checkpoint`` on test and score it; its translations go to
    ``OUT/translations/NAME-seedS.TAG.txt`` (committed with the cell: paired significance tests
    between models need the sentences, not only the corpus score) and the references scored
    against to ``OUT/translations/references.txt`` (the same file for every cell of a corpus; the
    view records its SHA-1 so that a test can tell)."""
    scores = decode(args, checkpoint, os.path.join(work, f"generate-{tag}.log"), env, keep_texts=True)
    folder = os.path.join(args.out, TRANSLATIONS)
    translations = os.path.join(folder, f"{name}-seed{args.seed}.{tag}.txt")
    write_lines(translations, scores.pop("hypotheses"))
    references = scores.pop("references")
    write_lines(os.path.join(folder, REFERENCES), references)
    return {**{k: point.get(k) for k in ("updates", "train_s")}, "valid_bleu": point.get("bleu"), **scores,
            "checkpoint": os.path.basename(checkpoint), "translations": os.path.relpath(translations, args.out),
            "references_sha1": lines_sha1(references)}


def keep_scored_checkpoints(work: str, cell: dict) -> List[str]:
    """After a cell is scored: delete the update checkpoints and ``checkpoint_last.pt`` (dozens of
    ~85 MB files with optimizer state), keep the ones its views were decoded from (what inference
    modes, serving and export of a converged model start from) and the logs. Without
    ``checkpoint_last.pt`` the folder is no longer resumable, so a rerun of the cell trains afresh."""
    save_dir = os.path.join(work, "checkpoints")
    kept = sorted({cell[view]["checkpoint"] for view in ("best", "averaged", "equal_time")
                   if "checkpoint" in cell.get(view, {})})
    for file in os.listdir(save_dir):
        if file.endswith(".pt") and file not in kept:
            os.remove(os.path.join(save_dir, file))
    return [os.path.join(save_dir, file) for file in kept]


def average_checkpoints(args, save_dir: str, env: dict) -> tuple:
    saved = update_checkpoints(save_dir)
    chosen = sorted(saved)[-args.average:]
    out = os.path.join(save_dir, f"average-last{args.average}.pt")
    run([os.path.join(BIN, "fairseq-thor-average"), *(saved[u] for u in chosen), "--out", out],
        os.path.join(os.path.dirname(save_dir), "average.log"), env=env)
    return out, chosen


# ---- the cell ----------------------------------------------------------------------------------

def prepare_work(work: str, recipe_now: dict) -> bool:
    """Make ``work`` ready for ``recipe_now``; True when it resumes (fairseq itself then loads
    ``checkpoint_last.pt``), False for a fresh start (a folder of another recipe, or without a
    checkpoint, is cleared first)."""
    recorded = os.path.join(work, "recipe.json")
    last = os.path.join(work, "checkpoints", "checkpoint_last.pt")
    if os.path.exists(recorded) and os.path.exists(last):
        with open(recorded) as f:
            was = without_threads(json.load(f))
        if was == recipe_now:
            return True
        # said out loud: hours of checkpoints go, on purpose (they answer another recipe)
        print(f"    {work}: its checkpoints were trained with another recipe ({recipe_change(was, recipe_now)}); "
              "clearing it and training afresh", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "checkpoints"))
    write_json(recorded, recipe_now)
    return False


def attempt_threads(work: str) -> Dict[int, Optional[int]]:
    """The --threads of each attempt (attempt number -> threads; None: torch's default)."""
    path = os.path.join(work, "attempts.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {int(k): v for k, v in json.load(f).items()}


def record_attempt(work: str, number: int, threads: Optional[int]):
    write_json(os.path.join(work, "attempts.json"), {**attempt_threads(work), number: threads})


def train(args, cell: dict, work: str, env: dict, settings: dict) -> List[str]:
    """Train (or resume, or skip when finished); return every attempt's log text."""
    finished = os.path.join(work, "trained.json")
    if not os.path.exists(finished):
        number = len(attempt_logs(work)) + 1
        cmd = cell["train_command"] = converge_command(args, cell["model"], cell["seed"],
                                                       os.path.join(work, "checkpoints"))
        record_attempt(work, number, args.threads)
        with periodically(args.pack_every * 60, lambda: pack_cell(args, cell["model"], cell["seed"], settings)):
            run(cmd, os.path.join(work, f"train-{number}.log"), echo=fairseq_logs.progress, env=env)
        write_json(finished, {"finished_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    return attempt_texts(work)


@contextmanager
def periodically(seconds: float, action):
    """Call ``action`` every ``seconds`` in a background thread while the block runs (never when
    ``seconds`` is 0); an error is printed, not raised: the training it watches goes on."""
    stop = threading.Event()

    def loop():
        while not stop.wait(seconds):
            try:
                action()
            except Exception as e:  # noqa: BLE001 -- a failed pack must not end hours of training
                print(f"    packing for the next session failed: {type(e).__name__}: {e}", flush=True)

    thread = threading.Thread(target=loop, daemon=True) if seconds > 0 else None
    if thread:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread:
            thread.join()


def train_and_score(args, cell: dict, work: str, env: dict, settings: dict):
    name, seed = cell["model"], cell["seed"]
    logs = train(args, cell, work, env, settings)  # one text per attempt
    save_dir = os.path.join(work, "checkpoints")
    seconds = seconds_across_attempts(logs)
    curve = valid_curve(logs, seconds)
    trained = [fairseq_logs.parse_train_log(t) for t in logs if " | train_inner | " in t]
    last = trained[-1] if trained else fairseq_logs.parse_train_log(logs[-1])  # params, last statistics
    updates = max(seconds)
    saved = update_checkpoints(save_dir)
    if not curve or not saved:
        raise RuntimeError(f"no validated checkpoint in {save_dir}")
    best_point = best_within(curve, max(saved), saved)
    if best_point is None:
        raise RuntimeError(f"no checkpoint in {save_dir} has a validation BLEU")
    missing = not_saved(curve, saved, best_point)
    if missing:  # a carry always holds the best so far (checkpoints_scoring_may_need)
        raise RuntimeError(f"the best validation BLEU was at update {missing}, whose checkpoint is not in {save_dir}")
    # one attempt per training command: more than one when the cell was interrupted and resumed
    threads = attempt_threads(work)
    cell.update(attempts=[{"log": f"train-{i}.log", "resumed_from": resumed_at(t), "threads": threads.get(i)}
                          for i, t in enumerate(logs, 1)],
                updates=updates, train_s=seconds[updates], stopped_by=stop_reason(logs, updates, args.max_update),
                train_words_per_s=words_per_second(logs), total_params=last["total_params"], curve=curve,
                train_last=last["train_last"], carried=carried(work))
    model = MODELS[name]
    cell.update(count_params(saved[best_point["updates"]], cell["total_params"],
                             model.experts or args.gated_experts, 1))

    seeded = _with_seed(args, seed)
    cell["best"] = scored(seeded, name, saved[best_point["updates"]], best_point, work, "best", env)
    averaged, chosen = average_checkpoints(args, save_dir, env)
    cell["averaged"] = {"checkpoints": chosen, **scored(seeded, name, averaged, {"updates": chosen[-1],
                        "train_s": seconds.get(chosen[-1])}, work, "averaged", env)}
    if name == "dense":
        cell["equal_time"] = {"from": "its own best", **cell["best"]}
        return
    budget = equal_time_budget(args, name, seed, settings)
    if "missing" in budget:
        cell["equal_time"] = budget
        return
    point = best_within(curve, budget["budget_updates"], saved)
    missing = point and not_saved([p for p in curve if p["updates"] <= budget["budget_updates"]], saved, point)
    if missing:  # a carry packed before this budget existed (dense of this seed unfinished then)
        cell["equal_time"] = {**budget, "missing": f"the best checkpoint within the budget (update {missing}) "
                                                   "was not carried across sessions"}
    elif point is None:
        cell["equal_time"] = {**budget, "missing": f"no checkpoint within {budget['budget_updates']} updates"}
    elif point["updates"] == best_point["updates"]:
        cell["equal_time"] = {**budget, **cell["best"]}
    else:
        cell["equal_time"] = {**budget, **scored(seeded, name, saved[point["updates"]], point, work, "equal-time", env)}


def not_saved(curve: List[dict], saved: Dict[int, str], chosen: dict) -> Optional[int]:
    """The update of a validation better than ``chosen`` whose checkpoint is gone, if any: after a
    carry only the checkpoints scoring may need are there, and choosing among the others would
    quietly score a worse one."""
    better = [p["updates"] for p in curve if p["bleu"] is not None and p["updates"] not in saved
              and (p["bleu"], -p["updates"]) > (chosen["bleu"], -chosen["updates"])]
    return better[0] if better else None


def carried(work: str) -> List[dict]:
    """The carries a cell went on from (convergence_carry.restore), oldest first."""
    path = os.path.join(work, "carried.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def _with_seed(args, seed: int):
    import copy

    seeded = copy.copy(args)
    seeded.seed = seed
    return seeded


def cell_work(args, name: str, seed: int) -> str:
    """A cell's checkpoints and logs: kept across attempts, and after scoring while it awaits a budget."""
    return os.path.join(args.work, "cells", f"{name}-seed{seed}")


def run_converge_cell(args, name: str, seed: int, env: dict, settings: dict) -> dict:
    work = cell_work(args, name, seed)
    recipe_now = converge_recipe(args, name, seed)
    restore_carried(args, name, seed, recipe_now)
    if prepare_work(work, recipe_now):
        done = os.path.exists(os.path.join(work, "trained.json"))
        print(f"    {name} seed {seed}: " + ("training had finished; scoring its checkpoints" if done else
              f"resuming from {os.path.join(work, 'checkpoints', 'checkpoint_last.pt')}"), flush=True)
    cell = started_cell(args, name, seed, recipe_now, settings, mode="converge")
    filled_and_written(args, cell, lambda c: train_and_score(args, c, work, env, settings))
    if cell["status"] == "ok" and budget_was_missing(cell):
        # its checkpoints are what a rerun scores once the budget exists (needs_rescoring)
        print(f"    {name} seed {seed}: equal training time not scored ({cell['equal_time']['missing']}); "
              f"keeping {work} to score it on a rerun", flush=True)
    elif cell["status"] == "ok" and not args.keep:  # a failed or interrupted cell keeps what resumes it
        kept = keep_scored_checkpoints(work, cell)
        print(f"    {name} seed {seed}: kept its scored checkpoints ({', '.join(map(os.path.basename, kept))}) "
              f"in {os.path.dirname(kept[0]) if kept else work}; the other checkpoints are deleted", flush=True)
    if cell["status"] == "ok" and not budget_was_missing(cell) and os.path.isdir(carry_of(args, name, seed)):
        shutil.rmtree(carry_of(args, name, seed))  # the cell file says it all now
        print(f"    {name} seed {seed}: scored; deleted its carry {carry_of(args, name, seed)}", flush=True)
    return cell


# ---- across sessions ---------------------------------------------------------------------------

def carry_of(args, name: str, seed: int) -> str:
    return convergence_carry.carry_folder(args.out, f"{name}-seed{seed}")


def pack_cell(args, name: str, seed: int, settings: dict) -> Optional[dict]:
    """Pack a cell's work folder into OUT/carry/ for the next session; None when it has nothing to
    go on from (not started, or scored and pruned)."""
    work = cell_work(args, name, seed)
    save_dir = os.path.join(work, "checkpoints")
    if not os.path.exists(os.path.join(save_dir, "checkpoint_last.pt")):
        return None
    with open(os.path.join(work, "recipe.json")) as f:
        recipe_then = without_threads(json.load(f))
    trained = os.path.exists(os.path.join(work, "trained.json"))

    def choose(last_update: int):
        saved = {u: path for u, path in update_checkpoints(save_dir).items() if u <= last_update}
        curve = [p for p in valid_curve(attempt_texts(work), {}) if p["updates"] <= last_update]
        budget = None if name == "dense" else equal_time_budget(args, name, seed, settings).get("budget_updates")
        return saved, checkpoints_scoring_may_need(curve, saved, trained, args.patience, args.average,
                                                   args.save_every, budget)

    meta = convergence_carry.pack(work, carry_of(args, name, seed), recipe_then, args.data, choose)
    print(f"    {name} seed {seed}: packed for the next session into {carry_of(args, name, seed)} "
          f"({convergence_carry.describe(meta)}); commit it", flush=True)
    return meta


def restore_carried(args, name: str, seed: int, recipe_now: dict):
    """Rebuild the cell's work folder from its committed carry when the carry has trained further
    than the folder (a new session has no folder at all)."""
    folder = carry_of(args, name, seed)
    meta = convergence_carry.read(folder)
    if meta is None or updates_logged(args, name, seed, carry=False) >= meta["update"]:
        return
    if without_threads(meta["recipe"]) != recipe_now:
        print(f"    {name} seed {seed}: not restoring {folder}: it was packed for another recipe "
              f"({recipe_change(without_threads(meta['recipe']), recipe_now)})", flush=True)
        return
    convergence_carry.restore(folder, cell_work(args, name, seed), args.data)
    print(f"    {name} seed {seed}: restored from the carry {folder} ({convergence_carry.describe(meta)})",
          flush=True)


# ---- how long the rest of the plan takes -------------------------------------------------------

VALIDATION_SHARE = 1.05  # validation and saves every 250 updates: ~2% on dense, ~10% on THOR (measured once)


def updates_logged(args, name: str, seed: int, carry: bool = True) -> int:
    """The last update an unfinished cell's attempts have logged, or (``carry``) the update its
    committed carry goes on from when that is further (0 when it has not started)."""
    work = cell_work(args, name, seed)
    logged = max(progress_across_attempts(attempt_texts(work)), default=0) if os.path.isdir(work) else 0
    meta = convergence_carry.read(carry_of(args, name, seed)) if carry else None
    return max(logged, meta["update"] if meta else 0)


def time_left(args, todo: List[tuple], settings: dict) -> dict:
    """Seconds left for ``todo`` at the calibrated seconds per update: each cell's expected updates
    (the mean of the finished cells') less what its work folder has trained; or {"missing": why}.
    A cell's own elapsed time says nothing here: it is the last of several attempts, under
    whatever load and threads each had."""
    finished = [c for c in quality_report.load_cells(os.path.join(args.out, "cells"))
                if c.get("status") == "ok" and c.get("mode") == "converge"]
    if not finished:
        return {"missing": "after the first cell"}
    recorded, why = training_cost.calibration(args.out, settings)
    if recorded is None:
        return {"missing": f"unknown: {why}"}
    costs = recorded["s_per_update"]
    uncalibrated = sorted({name for name, _ in todo} - set(costs))
    if uncalibrated:
        return {"missing": f"unknown: {training_cost.COST_FILE} has no seconds per update for "
                           f"{', '.join(uncalibrated)}; run benchmarks/quality.py --converge --measure-cost "
                           "with them in --plan"}
    expected = sum(c["updates"] for c in finished) / len(finished)
    left = sum(max(expected - updates_logged(args, name, seed), 0) * costs[name] for name, seed in todo)
    return {"seconds": left * VALIDATION_SHARE, "updates_per_cell": expected,
            "threads": recorded.get("threads")}


def needs_rescoring(args, cell: dict, settings: dict) -> bool:
    """A finished cell whose equal-time view was missing (no dense cell or no cost calibration
    yet), whose trained checkpoints are still there, and which has a budget now (otherwise every
    run of the plan would decode it again for nothing)."""
    trained = os.path.join(cell_work(args, cell["model"], cell["seed"]), "trained.json")
    return (budget_was_missing(cell) and os.path.exists(trained)
            and "budget_updates" in equal_time_budget(args, cell["model"], cell["seed"], settings))


def budget_was_missing(cell: dict) -> bool:
    """Equal time not scored for want of a budget (not because no checkpoint fitted in it)."""
    timed = cell.get("equal_time") or {}
    return "missing" in timed and "budget_updates" not in timed
