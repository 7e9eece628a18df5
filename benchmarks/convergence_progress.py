"""Where the unfinished cells of ``benchmarks/quality.py --converge`` stand, read from their work
folders' training logs.

A THOR cell takes several sittings on 2 CPU cores; until it is scored it has no cell file, so the
report's tables cannot show it. This module gives the report an "in progress" section instead of
hand-written status lines: each unfinished cell's updates so far, its latest and best validation
BLEU, and what the finished dense cells had reached at the same update and at the same calibrated
training time. These are not results (greedy validation BLEU of a model still training). They are
read from the work folders (``work/``, not committed) or, for a cell whose folder is absent or less
trained, from the logs in its committed carry (OUT/carry/<cell>/work/, ``convergence_carry.py``), so
a report rebuilt on a fresh clone still shows them.
"""
import os
import re
from typing import Dict, List, Optional

from convergence_carry import CARRY
from convergence_cells import attempt_texts, progress_across_attempts, valid_curve
from quality_cells import finished

CELL_FOLDER = re.compile(r"(?P<model>[a-z0-9]+)-seed(?P<seed>\d+)")


def cell_folders(work_dir: Optional[str], out_dir: str) -> Dict[str, List[str]]:
    """Each cell's folders of attempt logs: its work folder, its committed carry's, or both."""
    found: Dict[str, List[str]] = {}
    for entry in _entries(os.path.join(work_dir, "cells")) if work_dir else []:
        found.setdefault(entry.name, []).append(entry.path)
    for entry in _entries(os.path.join(out_dir, CARRY)):
        if os.path.isdir(os.path.join(entry.path, "work")):
            found.setdefault(entry.name, []).append(os.path.join(entry.path, "work"))
    return found


def _entries(folder: str) -> List[os.DirEntry]:
    return sorted((e for e in os.scandir(folder) if e.is_dir()), key=lambda e: e.name) if os.path.isdir(folder) else []


def unfinished(work_dir: Optional[str], out_dir: str) -> List[dict]:
    """Every cell that has trained and has no finished cell file, from the most trained of its work
    folder and its carry."""
    rows = []
    for name, folders in sorted(cell_folders(work_dir, out_dir).items()):
        m = CELL_FOLDER.fullmatch(name)
        if not m:
            continue
        if finished(os.path.join(out_dir, "cells", f"{name}.json")):
            continue  # finished: its folder only keeps the scored checkpoints
        updates, logs = max(((max(progress_across_attempts(t), default=0), t) for t in map(attempt_texts, folders)),
                            key=lambda pair: pair[0])
        curve = [p for p in valid_curve(logs, {}) if p["bleu"] is not None]
        if not curve:
            continue
        best = max(curve, key=lambda p: (p["bleu"], -p["updates"]))
        rows.append({"model": m["model"], "seed": int(m["seed"]), "updates": max(updates, curve[-1]["updates"]),
                     "attempts": len(logs), "latest": {"updates": curve[-1]["updates"], "bleu": curve[-1]["bleu"]},
                     "best": {"updates": best["updates"], "bleu": best["bleu"]},
                     "curve": [{"updates": p["updates"], "bleu": p["bleu"]} for p in curve]})
    return rows


def dense_at(dense_curves: List[List[dict]], updates: float) -> Optional[float]:
    """Mean validation BLEU of the finished dense cells at their last validation at or before
    ``updates`` (None when a dense cell had not validated yet, or there is none)."""
    reached = []
    for curve in dense_curves:
        before = [p["bleu"] for p in curve if p["updates"] <= updates and p["bleu"] is not None]
        if not before:
            return None
        reached.append(before[-1])
    return round(sum(reached) / len(reached), 2) if reached else None


def compared_with_dense(rows: List[dict], dense_curves: List[List[dict]], costs: Optional[Dict[str, float]]):
    """Add to each row dense's validation BLEU at the same update and at the same calibrated time
    (dense's updates = the row's updates x its s/update / dense's s/update)."""
    for row in rows:
        at = row["latest"]["updates"]
        row["dense_same_updates"] = dense_at(dense_curves, at)
        cost, dense_cost = (costs or {}).get(row["model"]), (costs or {}).get("dense")
        row["calibrated_s"] = round(at * cost) if cost else None
        row["dense_same_time"] = dense_at(dense_curves, at * cost / dense_cost) if cost and dense_cost else None
    return rows
