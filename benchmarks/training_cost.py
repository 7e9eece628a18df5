"""Seconds per training update of every model of the convergence study, measured side by side.

A convergence cell trains for hours, over several sittings: some attempts with one thread beside
other work, some on two idle cores, some paused while a timed benchmark ran. The seconds a cell
records inside its training steps (fairseq's ``train_wall``) therefore compare only between cells
trained under the same conditions, which a study spread over sittings cannot promise. The study's
time views (equal training time, BLEU against training time) use a calibrated cost instead: each
model's seconds per update, measured here in one run with the models interleaved round by round
(dense, rdrop, ..., then again), so that a drift in the machine's load falls on every model alike.
A model's training time at update u is then u x its seconds per update.

Each measurement is a real ``fairseq-train`` of the cell's recipe (same corpus, sizes, batch,
experts) from scratch, without validation or saving: the first ``warm`` updates (start-up, first
allocations) are not timed, the next ``timed`` are, from fairseq's updates per second in three
logged intervals. Written to
``OUT/cost.json`` with every round's figure; the median of the rounds is the cost.

    python benchmarks/quality.py --converge --measure-cost            # the plan's models, 2 rounds
"""
import copy
import json
import os
import statistics
import time
from typing import Dict, List

import fairseq_logs
from cli_runs import run
from atomic_files import write_json
from quality_cells import train_command

COST_FILE = "cost.json"
# what decides the work of one update; a calibration made with other values is refused
COST_SETTINGS = ("layers", "embed_dim", "ffn_dim", "heads", "normalize_before", "vocab", "max_tokens", "dropout",
                 "gated_experts", "capacity_factor", "device", "fp16")


def cost_key(settings: dict) -> dict:
    return {k: settings.get(k) for k in COST_SETTINGS}


def timed_command(args, name: str, updates: dict, save_dir: str) -> list:
    """The cell's training command, cut to ``warm + timed`` updates, logging every ``timed / 3``,
    without validation or checkpoints (later flags win in fairseq's argument parser)."""
    sized = copy.copy(args)
    sized.max_update = updates["warm"] + updates["timed"]
    return train_command(sized, name, 1, save_dir) + [
        "--log-interval", str(updates["timed"] // 3), "--disable-validation", "--no-save"]


def seconds_per_update(log: str, warm: int) -> float:
    """Seconds per update after the first ``warm`` updates, from each logged interval's updates per
    second (``ups``: everything between two updates, data loading included; logged with two
    decimals, where ``train_wall`` has whole seconds)."""
    intervals, previous, total, counted = [], 0, 0.0, 0
    for line in log.splitlines():
        if " | train_inner | " in line:
            stats = fairseq_logs.comma_stats(line)
            if "num_updates" in stats and stats.get("ups"):
                intervals.append((int(stats["num_updates"]), stats["ups"]))
    for u, ups in intervals:
        if previous >= warm:
            total, counted = total + (u - previous) / ups, counted + (u - previous)
        previous = u
    if not counted:
        raise RuntimeError(f"no timed interval after update {warm} in the log")
    return total / counted


def measure(args, names: List[str], env: dict, work: str, rounds: int, warm: int, timed: int,
            say=print) -> dict:
    """Every model of ``names`` once per round, in the same order each round."""
    updates = {"warm": warm, "timed": timed}
    if timed < 3 or timed % 3:
        raise ValueError(f"timed updates must be a positive multiple of 3, got {timed}")
    per_round: Dict[str, List[float]] = {n: [] for n in names}
    os.makedirs(work, exist_ok=True)
    load_at_start = list(os.getloadavg())
    for r in range(1, rounds + 1):
        for name in names:
            log = os.path.join(work, f"cost-{name}-round{r}.log")
            text = run(timed_command(args, name, updates, os.path.join(work, "unused-save-dir")), log, env=env)
            per_round[name].append(round(seconds_per_update(text, warm), 5))
            say(f"    round {r}/{rounds} {name}: {per_round[name][-1]:.3f} s/update")
    cost = {n: statistics.median(v) for n, v in per_round.items()}
    dense = cost.get("dense")
    return {"s_per_update": cost, "rounds": per_round,
            "relative_to_dense": {n: round(c / dense, 3) for n, c in cost.items()} if dense else None,
            "warm_updates": warm, "timed_updates": timed, "threads": args.threads, "device": args.device,
            "host": args.host, "load_average_at_start": load_at_start, "load_average_at_end": list(os.getloadavg()),
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def write(out_dir: str, measured: dict, settings: dict):
    write_json(os.path.join(out_dir, COST_FILE), {**measured, "recipe": cost_key(settings)})


def calibration(out_dir: str, settings: dict) -> tuple:
    """(the whole recorded calibration, None) or (None, why there is no usable calibration)."""
    recipe_key = cost_key(settings)
    path = os.path.join(out_dir, COST_FILE)
    if not os.path.exists(path):
        return None, (f"no cost calibration ({path}); run benchmarks/quality.py --converge --measure-cost")
    with open(path) as f:
        recorded = json.load(f)
    if recorded.get("recipe") != recipe_key:
        changed = sorted(k for k in recorded.get("recipe", {}).keys() | recipe_key.keys()
                         if recorded.get("recipe", {}).get(k) != recipe_key.get(k))
        return None, (f"{path} was measured with another recipe (differs in {', '.join(changed)}); "
                      "run benchmarks/quality.py --converge --measure-cost again")
    return recorded, None


def load(out_dir: str, settings: dict) -> tuple:
    """(seconds per update by model, None) or (None, why there is no usable calibration)."""
    recorded, why = calibration(out_dir, settings)
    return (recorded["s_per_update"], None) if recorded else (None, why)
