"""One (model, seed) cell of ``benchmarks/quality.py``: the models, the training command, the cell
file, and the run that fills it.

A cell trains once, checkpointing every K updates, and records each checkpoint's cumulative time
inside training steps (from fairseq's log). It decodes the final checkpoint; a two-pass model
(R-Drop, THOR) also decodes the last checkpoint within dense's training time for the same seed,
or every checkpoint when that dense cell is not finished yet (the report then picks one).
A cell's ``recipe`` (its training flags, decoding, threads) tells a rerun whether it is stale.
"""
import copy
import glob
import importlib.metadata
import json
import os
import platform
import re
import shutil
import time
from typing import List, NamedTuple, Optional

import atomic_files
import fairseq_logs as logs
import quality_report
from cli_runs import BIN, GATED, USER_DIR, count_params, decode, model_flags, run


class Model(NamedTuple):
    experts: Optional[int]  # None: --gated-experts
    flags: List[str]  # after the sizes; {consistency_alpha}, {rdrop_alpha}, {capacity_factor} filled in
    two_pass: bool  # two forward/backward passes per update: the equal-time view stops it early


THOR = ["--criterion", "thor_consistency", "--consistency-alpha", "{consistency_alpha}"]
THOR_ALPHA5 = ["--criterion", "thor_consistency", "--consistency-alpha", "5"]  # the paper's IWSLT alpha
MODELS = {  # dense first: the two-pass models of a seed get its training time
    "dense": Model(1, ["--criterion", "label_smoothed_cross_entropy"], False),
    "rdrop": Model(1, ["--criterion", "label_smoothed_cross_entropy_with_rdrop",
                       "--rdrop-alpha", "{rdrop_alpha}"], True),
    "thor2": Model(2, THOR, True),
    "thor4": Model(4, THOR, True),
    "switch": Model(None, ["--expert-router", "switch", *GATED], False),
    "hash": Model(None, ["--expert-router", "hash", *GATED], False),
    "thor2a5": Model(2, THOR_ALPHA5, True),
    "thor8": Model(8, THOR, True),
    # R-Drop's terms (two label-smoothed CEs + alpha x symmetric KL, ntokens normalisation) through
    # thor_consistency on the dense model: the same objective as "rdrop" at 1.9x dense per update
    # instead of fairseq's 3.2x (speed.py), for an equal-time view that charges the method, not
    # fairseq's loss code. The convergence plan's R-Drop rows; not in the 1,000-update plan
    "rdropf": Model(1, ["--criterion", "thor_consistency", "--consistency-alpha", "{rdrop_alpha}"], True),
}
# the arguments every cell records (the report prints them in its header)
SETTINGS = ["layers", "embed_dim", "ffn_dim", "heads", "normalize_before", "vocab", "max_update",
            "save_every", "max_tokens", "warmup",
            "threads", "lr", "dropout", "weight_decay", "label_smoothing", "clip_norm", "consistency_alpha",
            "consistency_alpha_warmup_updates", "rdrop_alpha", "gated_experts", "capacity_factor",
            "data", "device", "fp16", "remove_bpe", "test_sentences", "references"]


def train_command(args, name: str, seed: int, save_dir: str) -> list:
    model = MODELS[name]
    flags = [f.format(**vars(args)) for f in model.flags]
    if model.flags in (THOR, THOR_ALPHA5) and args.consistency_alpha_warmup_updates:
        flags += ["--consistency-alpha-warmup-updates", args.consistency_alpha_warmup_updates]
    k = args.save_every
    return [str(arg) for arg in [
        os.path.join(BIN, "fairseq-train"), args.data, "--user-dir", USER_DIR, *args.device_flags,
        "--task", "translation_thor", *model_flags(args, model.experts or args.gated_experts), *flags,
        *(["--encoder-normalize-before", "--decoder-normalize-before"] if args.normalize_before else []),
        "--label-smoothing", args.label_smoothing, "--dropout", args.dropout,
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--weight-decay", args.weight_decay,
        "--clip-norm", args.clip_norm, "--lr", args.lr, "--lr-scheduler", "inverse_sqrt",
        "--warmup-updates", args.warmup, "--max-tokens", args.max_tokens, "--max-update", args.max_update,
        "--seed", seed,
        # every K updates: log (train_wall -> each checkpoint's training time), validate, save
        "--log-format", "simple", "--log-interval", k, "--validate-interval-updates", k,
        "--save-interval-updates", k, "--validate-interval", 10**6, "--save-interval", 10**6,
        "--no-epoch-checkpoints", "--no-save-optimizer-state", "--save-dir", save_dir,
        *args.extra.get(name, []),
    ]]


def recipe(args, name: str, seed: int) -> dict:
    """What makes a cell's result: its training command (without the local paths of the
    executable and save dir), decoding and threads. A finished cell with another recipe is stale."""
    cmd = [t if t != USER_DIR else "USER_DIR" for t in train_command(args, name, seed, "SAVE_DIR")[1:]]
    return {"train_flags": cmd, "remove_bpe": args.remove_bpe, "threads": args.threads}


def recipe_change(old: Optional[dict], new: dict) -> Optional[str]:
    """None when equal, else a short description of what changed."""
    if old == new:
        return None
    if not old:
        return "no recorded recipe"

    def flags(tokens):  # {"--flag": "value" or "" for a switch; "(data)": the positional}
        pairs, key = {}, "(data)"
        for t in tokens:
            if t.startswith("--"):
                key = t
                pairs[t] = ""
            elif key:
                pairs[key], key = t, None
        return pairs

    was, now = flags(old.get("train_flags", [])), flags(new["train_flags"])
    changes = [f"{k} {was.get(k, '(absent)') or '(set)'} -> {now.get(k, '(absent)') or '(set)'}"
               for k in sorted(was.keys() | now.keys()) if was.get(k) != now.get(k)]
    changes += [f"{k} {old.get(k)} -> {new.get(k)}" for k in ("remove_bpe", "threads", "average")
                if old.get(k) != new.get(k)]
    return "; ".join(changes[:4]) or "the same flags in another order"


def host_info(args) -> dict:
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    versions = {}
    for package in ("torch", "fairseq-fixed", "fairseq", "sacrebleu"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    info = {"hostname": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), **versions}
    if args.device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def dense_seconds(args, seed: int) -> Optional[float]:
    dense = read_cell(cell_path(args, "dense", seed))
    return dense["train_s"] if dense and dense["status"] == "ok" else None


def saved_checkpoints(save_dir: str, seconds: dict, last_update: int) -> List[dict]:
    """Checkpoints on disk with their cumulative training time (updates in order); fairseq skips
    an update-numbered checkpoint at an epoch's end, so some multiples of K may be absent."""
    found = {}
    for path in glob.glob(os.path.join(save_dir, "checkpoint_*_*.pt")):
        m = re.search(r"checkpoint_\d+_(\d+)\.pt$", path)
        if m:
            found[int(m.group(1))] = path
    found[last_update] = os.path.join(save_dir, "checkpoint_last.pt")  # always written at the end
    if last_update not in seconds:
        raise RuntimeError(f"no train_inner log line at update {last_update}: cannot time the run")
    return [{"updates": u, "train_s": seconds[u], "path": found[u]} for u in sorted(found) if u in seconds]


def train_and_decode(args, cell: dict, work: str, env: dict):
    """Fill ``cell`` from one training run: training statistics, every checkpoint's training
    time, the scores of the final checkpoint and of those the equal-time view may need."""
    name, seed = cell["model"], cell["seed"]
    model = MODELS[name]
    save_dir = os.path.join(work, "checkpoints")
    cmd = cell["train_command"] = train_command(args, name, seed, save_dir)
    log = run(cmd, os.path.join(work, "train.log"), echo=logs.progress, env=env)
    train = logs.parse_train_log(log)
    if train["num_updates"] != args.max_update:
        raise RuntimeError(f"trained {train['num_updates']} updates, not {args.max_update}")
    seconds = logs.train_seconds_by_update(log)
    checkpoints = saved_checkpoints(save_dir, seconds, args.max_update)
    cell.update(updates=train["num_updates"], train_s=seconds[args.max_update],
                train_words_per_s=train["train_words_per_s"], total_params=train["total_params"],
                train_last=train["train_last"],
                valid_curve=[{**p, "train_s": seconds.get(p["num_updates"])} for p in train["valid_curve"]])
    cell.update(count_params(checkpoints[-1]["path"], train["total_params"], model.experts or args.gated_experts, 1))

    decoded = [checkpoints[-1]]
    if model.two_pass:
        budget = cell["dense_train_s"] = dense_seconds(args, seed)
        if budget is None:  # this seed's dense is not finished: score them all, the report picks
            decoded = checkpoints
        else:
            chosen = quality_report.within_budget(checkpoints, budget)
            if chosen is not None and chosen is not checkpoints[-1]:
                decoded = [chosen, checkpoints[-1]]
    seeded = copy.copy(args)
    seeded.seed = seed
    cell["generate_commands"] = []
    for c in decoded:
        scores = decode(seeded, c["path"], os.path.join(work, f"generate-{c['updates']}.log"), env)
        cell["generate_commands"].append(scores.pop("generate_command"))
        c.update(scores)
    cell["checkpoints"] = [{k: v for k, v in c.items() if k != "path"} for c in checkpoints]
    cell.update(quality_report.views(cell, cell.get("dense_train_s")))


def started_cell(args, name: str, seed: int, recipe_now: dict, settings: dict, **extra) -> dict:
    """A cell's record before it runs: what produces it and on which machine."""
    return {"model": name, "seed": seed, "status": "failed", "error": None, **extra,
            "two_pass": MODELS[name].two_pass, "recipe": recipe_now, "settings": settings,
            "device": args.device, "threads": args.threads, "host": args.host,
            "load_average_at_start": list(os.getloadavg()), "started_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def filled_and_written(args, cell: dict, fill) -> dict:
    """Run ``fill(cell)``; record how it ended (its error, not a raise: the study goes on) and how
    long it took, and write the cell file atomically."""
    start = time.time()
    try:
        fill(cell)
        cell["status"] = "ok"
    except Exception as e:  # keep going: the cell file says what broke
        cell["error"] = str(e)
    cell["elapsed_s"] = round(time.time() - start, 1)
    cell["load_average_at_end"] = list(os.getloadavg())
    atomic_files.write_json(cell_path(args, cell["model"], cell["seed"]), cell)
    return cell


def run_cell(args, name: str, seed: int, env: dict) -> dict:
    work = os.path.join(args.work, "cells", f"{name}-seed{seed}")
    shutil.rmtree(work, ignore_errors=True)  # a cell trains afresh, never resumes another run
    os.makedirs(work)
    cell = started_cell(args, name, seed, recipe(args, name, seed), {k: getattr(args, k) for k in SETTINGS})
    filled_and_written(args, cell, lambda c: train_and_decode(args, c, work, env))
    if not args.keep:  # a failed cell keeps its logs
        shutil.rmtree(work if cell["status"] == "ok" else os.path.join(work, "checkpoints"), ignore_errors=True)
    return cell


def cell_path(args, name: str, seed: int) -> str:
    return os.path.join(args.out, "cells", f"{name}-seed{seed}.json")


def read_cell(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def finished(path: str) -> bool:
    """Whether the cell file at ``path`` records a finished cell."""
    return (read_cell(path) or {}).get("status") == "ok"

