"""The report of ``benchmarks/quality.py``, rebuilt from whatever cell files exist.

Each finished cell (one model, one seed) holds its checkpoints' cumulative training times and the
scores of those it decoded. Two views come from that one run:

* equal updates: the final checkpoint;
* equal training time: for a two-pass model (R-Drop, THOR), the last checkpoint whose training time
  is within the time the one-pass dense model took for the same seed; a one-pass model keeps its
  final checkpoint. It is computed here, so a dense cell that finishes after a THOR cell still
  sets that cell's budget (the THOR cell decoded every checkpoint when dense was not there yet).

Per model and view: mean and sample standard deviation over seeds (n shown), and the differences
THOR - dense, THOR - Switch and THOR - R-Drop, called beyond the seeds' spread when they exceed
the sum of the two standard deviations (the +-1 std error bars do not overlap).
"""
import glob
import json
import os
import statistics
from typing import Dict, List, Optional

import atomic_files
from fairseq_logs import error_summary

VIEWS = {"equal_updates": "equal updates (final checkpoint)",
         "equal_time": "equal training time (two-pass models stopped at dense's time, same seed)"}
METRICS = {"bleu": "BLEU", "chrf": "chrF2"}
DIFFERENCES = [(thor, base) for thor in ("thor2", "thor4") for base in ("dense", "switch", "rdrop")]


def within_budget(checkpoints: List[dict], budget_s: float) -> Optional[dict]:
    """The last checkpoint whose cumulative training time is at most ``budget_s``, or None."""
    inside = [c for c in checkpoints if c["train_s"] <= budget_s]
    return inside[-1] if inside else None


def _point(checkpoint: dict, **extra) -> dict:
    lengths = {k: checkpoint[k] for k in ("bleu_bp", "length_ratio") if k in checkpoint}  # cells before these
    return {"updates": checkpoint["updates"], "train_s": checkpoint["train_s"],
            "bleu": checkpoint["bleu"], "chrf": checkpoint["chrf"], **lengths, **extra}


def views(cell: dict, dense_s: Optional[float]) -> Dict[str, dict]:
    """Both views of an ``ok`` cell; a view that cannot be scored says why under ``missing``."""
    final = cell["checkpoints"][-1]
    if not cell["two_pass"]:
        return {"equal_updates": _point(final), "equal_time": _point(final)}
    if dense_s is None:
        timed = {"missing": f"no finished dense cell for seed {cell['seed']}"}
    else:
        chosen = within_budget(cell["checkpoints"], dense_s)
        if chosen is None:
            timed = {"missing": f"no checkpoint within dense's {dense_s:.0f} s"}
        elif "bleu" not in chosen:
            timed = {"missing": f"the checkpoint within dense's {dense_s:.0f} s ({chosen['updates']} "
                                "updates) was not decoded (dense changed after this cell ran): --rerun it"}
        else:
            timed = _point(chosen, budget_s=dense_s)
    return {"equal_updates": _point(final), "equal_time": timed}


def load_cells(cells_dir: str) -> List[dict]:
    cells = []
    for path in sorted(glob.glob(os.path.join(cells_dir, "*.json"))):
        with open(path) as f:
            cells.append(json.load(f))
    return cells


def stats(values: List[float]) -> dict:
    """Mean and sample standard deviation (None for one value)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "mean": None, "std": None}
    return {"n": len(values), "mean": round(statistics.mean(values), 3),
            "std": round(statistics.stdev(values), 3) if len(values) > 1 else None}


def summarize(cells: List[dict], order: List[str]) -> dict:
    ok = [c for c in cells if c["status"] == "ok"]
    dense_s = {c["seed"]: c["train_s"] for c in ok if c["model"] == "dense"}
    rows = []
    for cell in sorted(cells, key=lambda c: (_rank(c["model"], order), c["seed"])):
        row = {k: cell.get(k) for k in ("model", "seed", "status", "error", "train_s", "elapsed_s")}
        # 1-minute load averages when the cell started and ended: a training uses ~2 on 2 cores,
        # so a higher figure means something else ran and its times are not comparable
        row["load"] = [(cell.get(k) or [None])[0] for k in ("load_average_at_start", "load_average_at_end")]
        if cell["status"] == "ok":
            row.update(views(cell, dense_s.get(cell["seed"])))
        rows.append(row)
    models = {}
    for name in sorted({c["model"] for c in ok}, key=lambda m: _rank(m, order)):
        mine = [c for c in ok if c["model"] == name]
        scored = [r for r in rows if r["model"] == name and r["status"] == "ok"]
        models[name] = {
            "seeds": [c["seed"] for c in mine],
            **{view: {key: stats([r[view].get(key) for r in scored])
                      for key in ("bleu", "chrf", "train_s", "updates")} for view in VIEWS},
            "two_pass": mine[0]["two_pass"], "train_words_per_s": stats([c["train_words_per_s"] for c in mine]),
            "total_params": mine[0]["total_params"], "active_params": mine[0]["active_params"],
        }
    settings = next((c["settings"] for c in ok), cells[0]["settings"] if cells else {})
    varying = sorted({k for c in cells for k, v in c["settings"].items() if settings.get(k) != v})
    return {"settings": settings, "settings_that_vary": varying, "models": models,
            "differences": differences(models), "cells": rows}


def _rank(model: str, order: List[str]) -> int:
    return order.index(model) if model in order else len(order)


def differences(models: dict) -> List[dict]:
    out = []
    for thor, base in DIFFERENCES:
        if thor not in models or base not in models:
            continue
        for view in VIEWS:
            entry = {"difference": f"{thor} - {base}", "view": view}
            for metric in METRICS:
                a, b = models[thor][view][metric], models[base][view][metric]
                if not a["n"] or not b["n"]:
                    continue
                delta = round(a["mean"] - b["mean"], 3)
                spread = round(a["std"] + b["std"], 3) if a["n"] > 1 and b["n"] > 1 else None
                entry[metric] = {"delta": delta, "spread": spread, "n": [a["n"], b["n"]],
                                 "beyond_spread": None if spread is None else abs(delta) > spread}
            if len(entry) > 2:
                out.append(entry)
    return out


def mean_std(s: dict, fmt: str = "{:.2f}") -> str:
    if not s["n"]:
        return "—"
    return fmt.format(s["mean"]) + (" ± " + fmt.format(s["std"]) if s["std"] is not None else "")


def table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _relative(text):
    """Paths inside the repository as the repository-relative paths a reader can use."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    return text.replace(repo, "") if isinstance(text, str) else text


def markdown(result: dict) -> str:
    s, models = result["settings"], result["models"]
    out = [
        "# Quality over seeds: dense vs R-Drop vs THOR vs Switch vs hash", "",
        f"{s.get('layers')}+{s.get('layers')} layers, d={s.get('embed_dim')}, FFN {s.get('ffn_dim')}, "
        f"{s.get('heads')} heads, shared embeddings; Adam (0.9, 0.98), inverse_sqrt, lr {s.get('lr')}, "
        f"warmup {s.get('warmup')}, dropout {s.get('dropout')}, weight decay {s.get('weight_decay')}, "
        f"label smoothing {s.get('label_smoothing')}, {s.get('max_tokens')} tokens per batch, "
        f"clip-norm {s.get('clip_norm') or 'off'}, {s.get('max_update')} updates, a checkpoint every "
        f"{s.get('save_every')}. Experts in every other layer: THOR E=2 (thor2) and E=4 (thor4), "
        f"consistency alpha {s.get('consistency_alpha')} (warmup {s.get('consistency_alpha_warmup_updates')} "
        f"updates); R-Drop alpha {s.get('rdrop_alpha')}; Switch and hash E={s.get('gated_experts')}, "
        f"capacity factor {s.get('capacity_factor')}. Device {s.get('device')}"
        f"{' (fp16)' if s.get('fp16') else ''}, threads {s.get('threads') or 'default'}. "
        f"Data `{_relative(s.get('data'))}`; test split ({s.get('test_sentences')} sentences) decoded with beam 5; "
        f"detokenized sacreBLEU against {_relative(s.get('references'))}.", "",
        "Mean ± sample standard deviation over seeds; n = seeds. Train s: seconds inside training "
        "steps (fairseq's `train_wall`, whole seconds per logged interval); times compare only on a "
        "machine that was otherwise idle for every cell (each cell records its load average).", "",
    ]
    if result["settings_that_vary"]:
        out += [f"**Warning:** the cells were not all trained the same way (differing: "
                f"{', '.join(result['settings_that_vary'])}); the header shows the first finished cell's.", ""]
    out += [f"## {VIEWS['equal_updates'].capitalize()}", ""]
    out += table(["model", "n", "BLEU", "chrF2", "train s", "train words/s", "total params",
                   "active params/token"],
                  [[m, str(v["equal_updates"]["bleu"]["n"]), mean_std(v["equal_updates"]["bleu"]),
                    mean_std(v["equal_updates"]["chrf"]), mean_std(v["equal_updates"]["train_s"], "{:.0f}"),
                    mean_std(v["train_words_per_s"], "{:,.0f}"), f"{v['total_params']:,}", f"{v['active_params']:,}"]
                   for m, v in models.items()])
    out += [f"## {VIEWS['equal_time'].capitalize()}", "",
            "One-pass models (dense, Switch, hash) keep their final checkpoint.", ""]
    out += table(["model", "n", "BLEU", "chrF2", "updates", "train s"],
                  [[m, str(v["equal_time"]["bleu"]["n"]), mean_std(v["equal_time"]["bleu"]),
                    mean_std(v["equal_time"]["chrf"]),
                    mean_std(v["equal_time"]["updates"], "{:.0f}"), mean_std(v["equal_time"]["train_s"], "{:.0f}")]
                   for m, v in models.items()])
    out += ["## Differences", "", "Beyond spread: |difference| > the sum of the two standard deviations "
            "(needs two seeds or more on both sides).", ""]
    verdict = {True: "yes", False: "no", None: "n/a"}
    out += table(["difference", "view", *(f"{name} {col}" for name in METRICS.values()
                                           for col in ("Δ", "spread", "beyond spread"))],
                  [[d["difference"], d["view"].replace("_", " "),
                    *(c for m in METRICS for c in (
                        (f"{d[m]['delta']:+.2f}", "—" if d[m]["spread"] is None else f"{d[m]['spread']:.2f}",
                         verdict[d[m]["beyond_spread"]]) if m in d else ("—", "—", "—")))]
                   for d in result["differences"]])
    out += ["## Cells", ""]
    cell_rows, notes = [], []
    for r in result["cells"]:
        if r["status"] != "ok":
            cell_rows.append([r["model"], str(r["seed"]), "failed", *["—"] * 8])
            notes.append(f"- `{r['model']}` seed {r['seed']} failed: {error_summary(r['error'])}")
            continue
        eu, et = r["equal_updates"], r["equal_time"]
        if "missing" in et:
            notes.append(f"- `{r['model']}` seed {r['seed']}, equal training time: {et['missing']}")
        load = r.get("load") or [None, None]
        cell_rows.append([r["model"], str(r["seed"]), "ok", f"{eu['bleu']:.2f}", f"{eu['chrf']:.2f}",
                          "—" if eu.get("length_ratio") is None else f"{eu['length_ratio']:.3f}",
                          *((f"{et['bleu']:.2f}", f"{et['chrf']:.2f}", str(et["updates"]))
                            if "missing" not in et else ("—", "—", "—")), f"{r['train_s']:.0f}",
                          " → ".join("—" if x is None else f"{x:.1f}" for x in load)])
    out += table(["model", "seed", "status", "BLEU (eq. updates)", "chrF2", "hyp/ref length", "BLEU (eq. time)",
                   "chrF2", "updates (eq. time)", "train s", "load (start → end)"], cell_rows)
    if notes:
        out += notes + [""]
    out += ["R-Drop's logged validation loss sums its two copies of the batch (fairseq's criterion), so "
            "it reads about twice the others' in the cells' `valid_curve`."]
    return "\n".join(out) + "\n"


def plot(result: dict, path: str):
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (name, m) in enumerate(result["models"].items()):
        color = f"C{i}"
        points = []
        for view, face in (("equal_updates", color), ("equal_time", "white"))[:2 if m["two_pass"] else 1]:
            x, y = m[view]["train_s"], m[view]["bleu"]
            if not y["n"]:
                continue
            points.append((x["mean"], y["mean"]))
            ax.errorbar(x["mean"], y["mean"], xerr=x["std"] or 0, yerr=y["std"] or 0, fmt="o", color=color,
                        markerfacecolor=face, capsize=3, label=name if view == "equal_updates" else None)
        if len(points) == 2:
            ax.plot(*zip(*points), ":", color=color)
    dense = result["models"].get("dense", {}).get("equal_updates", {}).get("train_s", {})
    if dense.get("n"):
        ax.axvline(dense["mean"], color="gray", linestyle="--", linewidth=0.8)
    ax.set_title("test BLEU vs training time (mean ± std over seeds)\n"
                 "filled: equal updates; hollow: stopped at dense's training time (dashed)")
    ax.set_xlabel("training time (s inside training steps)")
    ax.set_ylabel("BLEU")
    ax.grid(alpha=0.3)
    if result["models"]:
        ax.legend()
    fig.tight_layout()
    with atomic_files.replacing(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def build(out_dir: str, order: List[str]) -> dict:
    """Read ``out_dir/cells`` and write ``quality.md``, ``quality.json`` and ``quality.png``."""
    result = summarize(load_cells(os.path.join(out_dir, "cells")), order)
    atomic_files.write_text(os.path.join(out_dir, "quality.md"), markdown(result))
    atomic_files.write_json(os.path.join(out_dir, "quality.json"), result)
    plot(result, os.path.join(out_dir, "quality.png"))
    return result
