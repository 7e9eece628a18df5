"""The report of ``benchmarks/quality.py --converge``, rebuilt from whatever cell files exist.

Rows are models; a row pools the seeds of cells trained with the study's recipe. A cell trained
with another recipe (other flags, sizes, patience...) is listed apart and never pooled, so a change
of recipe cannot blend two studies into one mean. Paths, threads and the test-set size are not part
of the recipe (they change with the machine, not with the model).

Three views per model, each mean ± sample std over seeds: the best checkpoint (validation BLEU),
the average of the last N checkpoints, and equal training time (the best checkpoint within the
seconds dense needed to reach its best). Time is calibrated: updates x the model's seconds per
update measured side by side (``cost.json``, ``training_cost.py``); the cells' own ``train_wall``
is shown too, but it mixes sittings with different load and threads. The differences table
compares every THOR row with the baselines and THOR rows with each other, called beyond the spread when the difference exceeds the
sum of the two standard deviations; the targets of the study are evaluated from it. Paired
bootstrap tests on the test sentences (``paired_significance.py``) add the test-set noise of each
pair of cells whose translations are committed. Cells still training (no cell file yet) are shown
apart, from their work folders' logs (``convergence_progress.py``), and enter nothing above.
"""
import os
from typing import List, Optional

import atomic_files
import convergence_progress
import paired_significance
import training_cost
from fairseq_logs import error_summary
from quality_report import load_cells, mean_std, stats, table

VIEWS = {"best": "best checkpoint (validation BLEU)", "averaged": "average of the last checkpoints",
         "equal_time": "equal training time (best checkpoint within dense's time to its best)"}
METRICS = {"bleu": "BLEU", "chrf": "chrF2"}
THOR_ROWS = ("thor2", "thor2a5", "thor4", "thor8")
BASELINES = ("dense", "rdrop", "rdropf", "hash", "switch")
NOT_RECIPE = ("data", "test_sentences", "references", "threads")  # the machine's, not the model's


def recipe_key(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in NOT_RECIPE}


def summarize(cells: List[dict], order: List[str], settings: dict, costs: Optional[dict] = None,
              cost_missing: Optional[str] = None) -> dict:
    """``costs``: seconds per update by model (``training_cost.load``), None with ``cost_missing``."""
    key = recipe_key(settings)
    mine = [c for c in cells if recipe_key(c.get("settings", {})) == key]
    other = [c for c in cells if c not in mine]
    ok = [c for c in mine if c["status"] == "ok"]
    models = {}
    for name in sorted({c["model"] for c in ok}, key=lambda m: order.index(m) if m in order else len(order)):
        seeds = sorted((c for c in ok if c["model"] == name), key=lambda c: c["seed"])
        models[name] = {
            "seeds": [c["seed"] for c in seeds], "two_pass": seeds[0]["two_pass"],
            **{view: {k: stats([c[view].get(k) for c in seeds if c.get(view) and "missing" not in c[view]])
                      for k in ("bleu", "chrf", "updates", "train_s", "valid_bleu")} for view in VIEWS},
            "updates_at_stop": stats([c["updates"] for c in seeds]),
            "stopped_by": [c["stopped_by"] for c in seeds],
            "train_words_per_s": stats([c["train_words_per_s"] for c in seeds]),
            "total_params": seeds[0]["total_params"], "active_params": seeds[0]["active_params"],
            "s_per_update": (costs or {}).get(name),
        }
        for view in VIEWS:  # calibrated training seconds of each view's checkpoint
            cost = models[name]["s_per_update"]
            models[name][view]["cost_s"] = stats([c[view]["updates"] * cost for c in seeds if cost is not None
                                                  and c.get(view) and "missing" not in c[view]])
    hosts = sorted({c["host"].get("cpu", "?") for c in ok if c.get("host")})
    return {"settings": settings, "models": models, "differences": differences(models),
            "cost": {"s_per_update": costs} if costs else {"missing": cost_missing or "no calibration given"},
            "targets": targets(models), "hosts": hosts,
            "cells": [_cell_row(c) for c in sorted(mine, key=lambda c: (_rank(c["model"], order), c["seed"]))],
            "other_recipe": [{"model": c["model"], "seed": c["seed"],
                              "differs_in": sorted(k for k in key.keys() | recipe_key(c.get("settings", {})).keys()
                                                   if key.get(k) != c.get("settings", {}).get(k))} for c in other]}


def _rank(model: str, order: List[str]) -> int:
    return order.index(model) if model in order else len(order)


def _cell_row(c: dict) -> dict:
    row = {k: c.get(k) for k in ("model", "seed", "status", "error", "updates", "train_s", "stopped_by",
                                 "elapsed_s")}
    row["attempts"] = len(c.get("attempts") or [])
    row["load"] = [(c.get(k) or [None])[0] for k in ("load_average_at_start", "load_average_at_end")]
    row["cpu"] = (c.get("host") or {}).get("cpu")
    for view in VIEWS:
        if c["status"] == "ok":
            row[view] = {k: c[view].get(k) for k in ("bleu", "chrf", "updates", "train_s", "missing", "length_ratio")
                         if k in c[view]}
    return row


def _difference(a: dict, b: dict) -> Optional[dict]:
    if not a["n"] or not b["n"]:
        return None
    delta = round(a["mean"] - b["mean"], 3)
    spread = round(a["std"] + b["std"], 3) if a["n"] > 1 and b["n"] > 1 else None
    return {"delta": delta, "spread": spread, "n": [a["n"], b["n"]],
            "beyond_spread": None if spread is None else abs(delta) > spread}


PAIRS = [(t, b) for t in THOR_ROWS for b in BASELINES] + [("thor4", "thor2"), ("thor8", "thor4"), ("thor2a5", "thor2"),
                                                           ("rdropf", "rdrop")]  # one objective, two implementations
# paired tests on the test sentences: every pair at its best checkpoints, and at equal training time
# against dense (whose time is the budget)
PAIRED_VIEWS = {b: ["best", "equal_time"] if b == "dense" else ["best"] for b in {b for _, b in PAIRS}}


def differences(models: dict) -> List[dict]:
    out = []
    for a, b in PAIRS:
        if a not in models or b not in models:
            continue
        for view in VIEWS:
            entry = {"difference": f"{a} - {b}", "view": view}
            for metric in METRICS:
                d = _difference(models[a][view][metric], models[b][view][metric])
                if d:
                    entry[metric] = d
            if len(entry) > 2:
                out.append(entry)
    return out


def best_thor(models: dict) -> Optional[str]:
    """The THOR row with the highest mean validation BLEU at its best checkpoints. Chosen on
    validation, not test: the max of four settings' test scores would be biased upwards by the very
    test noise the targets then compare against."""
    scored = [(models[m]["best"]["valid_bleu"]["mean"], m) for m in THOR_ROWS
              if m in models and models[m]["best"]["valid_bleu"]["n"]]
    return max(scored)[1] if scored else None


def rdrop_row(models: dict) -> str:
    """The R-Drop row a target compares with: the plan's ``rdropf`` (R-Drop's objective at the
    plugin's cost), or fairseq's own criterion (``rdrop``) where only that one has cells."""
    return "rdrop" if "rdropf" not in models and "rdrop" in models else "rdropf"


def targets(models: dict) -> List[dict]:
    """The study's targets (issue 19), each met, missed or not measured yet, on the best view."""
    thor = best_thor(models)

    def check(name, a, b, margin=0.0, beyond=False):
        if a is None or a not in models or b not in models:
            return {"target": name, "status": "not measured yet"}
        d = _difference(models[a]["best"]["bleu"], models[b]["best"]["bleu"])
        if d["delta"] < margin:
            status = "missed"
        elif beyond and d["spread"] is None:
            status = "not decidable yet (needs 2 seeds on both sides)"
        else:
            status = "met" if not beyond or d["beyond_spread"] else "missed (within the spread)"
        return {"target": name, "rows": f"{a} - {b}", **d, "status": status}

    return [check("best THOR >= dense + 1.5 BLEU, beyond spread", thor, "dense", 1.5, beyond=True),
            check("best THOR >= R-Drop (mean)", thor, rdrop_row(models)),
            check("best THOR >= hash (mean)", thor, "hash"),
            check("THOR E=4 >= THOR E=2 (mean)", "thor4", "thor2")]


def markdown(result: dict) -> str:
    s, models = result["settings"], result["models"]
    out = [
        "# Quality at convergence: dense vs R-Drop vs hash vs Switch vs THOR", "",
        f"{s.get('layers')}+{s.get('layers')} layers, d={s.get('embed_dim')}, FFN {s.get('ffn_dim')}, "
        f"{s.get('heads')} heads, shared embeddings, pre-norm {s.get('normalize_before')}; Adam (0.9, 0.98), "
        f"inverse_sqrt, lr {s.get('lr')}, warmup {s.get('warmup')}, dropout {s.get('dropout')}, weight decay "
        f"{s.get('weight_decay')}, label smoothing {s.get('label_smoothing')}, {s.get('max_tokens')} tokens per "
        f"batch. Validation (greedy BLEU) and a checkpoint every {s.get('save_every')} updates; training stops "
        f"after {s.get('patience')} validations without a better BLEU, or at {s.get('max_update')} updates. "
        f"Averaged: the last {s.get('average')} checkpoints. THOR alpha {s.get('consistency_alpha')} "
        f"(thor2a5: 5); R-Drop alpha {s.get('rdrop_alpha')} (rdrop: fairseq's criterion; rdropf: the same "
        f"terms through thor_consistency, cheaper per update); Switch and hash E={s.get('gated_experts')}. "
        f"Test split decoded with beam 5, detokenized sacreBLEU, every sentence.", "",
        "Mean ± sample standard deviation over seeds (n). Calibrated s: updates × the model's seconds "
        "per update measured side by side in one run (`cost.json`: " + cost_line(result["cost"]) + "). "
        "Train s: seconds inside the cell's own training steps (fairseq's `train_wall`), summed over "
        "attempts that ran with different threads and load; they compare only loosely "
        f"(hosts here: {', '.join(result['hosts']) or '—'}).", ""]
    out += ["## At convergence", ""]
    out += table(["model", "n", "best BLEU", "best chrF2", "averaged BLEU", "averaged chrF2", "updates to best",
                  "calibrated s to best", "train s to best", "stopped by", "train words/s", "params (active)"],
                 [[m, str(v["best"]["bleu"]["n"]), mean_std(v["best"]["bleu"]), mean_std(v["best"]["chrf"]),
                   mean_std(v["averaged"]["bleu"]), mean_std(v["averaged"]["chrf"]),
                   mean_std(v["best"]["updates"], "{:.0f}"), mean_std(v["best"]["cost_s"], "{:.0f}"),
                   mean_std(v["best"]["train_s"], "{:.0f}"),
                   ", ".join(v["stopped_by"]), mean_std(v["train_words_per_s"], "{:,.0f}"),
                   f"{v['total_params']:,} ({v['active_params']:,})"] for m, v in models.items()])
    out += [f"## {VIEWS['equal_time'].capitalize()}", ""]
    out += table(["model", "n", "BLEU", "chrF2", "updates", "calibrated s", "s per update"],
                 [[m, str(v["equal_time"]["bleu"]["n"]), mean_std(v["equal_time"]["bleu"]),
                   mean_std(v["equal_time"]["chrf"]), mean_std(v["equal_time"]["updates"], "{:.0f}"),
                   mean_std(v["equal_time"]["cost_s"], "{:.0f}"),
                   "—" if v["s_per_update"] is None else f"{v['s_per_update']:.3f}"] for m, v in models.items()])
    out += ["## Targets", "", "Best THOR setting (highest mean validation BLEU at the best checkpoints: chosen on "
            f"validation, so that test noise does not pick it): {best_thor(models) or '—'}.", ""]
    out += table(["target", "rows", "Δ BLEU", "spread", "status"],
                 [[t["target"], t.get("rows", "—"), f"{t['delta']:+.2f}" if "delta" in t else "—",
                   "—" if t.get("spread") is None else f"{t['spread']:.2f}", t["status"]] for t in result["targets"]])
    out += ["## Differences", "", "Beyond spread: |difference| > the sum of the two standard deviations "
            "(needs two seeds on both sides).", ""]
    verdict = {True: "yes", False: "no", None: "n/a"}
    columns = [f"{n} {col}" for n in METRICS.values() for col in ("Δ", "spread", "beyond")]
    out += table(["difference", "view", *columns],
                 [[d["difference"], d["view"].replace("_", " "),
                   *(c for m in METRICS for c in (
                       (f"{d[m]['delta']:+.2f}", "—" if d[m]["spread"] is None else f"{d[m]['spread']:.2f}",
                        verdict[d[m]["beyond_spread"]]) if m in d else ("—", "—", "—")))]
                  for d in result["differences"]])
    out += paired_markdown(result.get("paired"))
    out += progress_markdown(result.get("in_progress") or [])
    out += ["## Cells", ""]
    rows, notes = [], []
    for r in result["cells"]:
        if r["status"] != "ok":
            rows.append([r["model"], str(r["seed"]), "failed", *["—"] * 8])
            notes.append(f"- `{r['model']}` seed {r['seed']} failed: {error_summary(r['error'])}")
            continue
        views = [("—" if "bleu" not in r[v] else f"{r[v]['bleu']:.2f}") for v in VIEWS]
        for v in VIEWS:
            if "missing" in r[v]:
                notes.append(f"- `{r['model']}` seed {r['seed']}, {v.replace('_', ' ')}: {r[v]['missing']}")
        load = " → ".join("—" if x is None else f"{x:.1f}" for x in r["load"])
        rows.append([r["model"], str(r["seed"]), r["stopped_by"], str(r["updates"]), str(r["best"]["updates"]),
                     *views, f"{r['train_s']:.0f}", load, r.get("cpu") or "—"])
    out += table(["model", "seed", "stopped by", "updates", "best at", "BLEU best", "BLEU averaged",
                  "BLEU equal time", "train s", "load (start → end)", "host"], rows)
    out += notes + ([""] if notes else [])
    if result["other_recipe"]:
        out += ["## Cells of another recipe (not pooled)", ""]
        out += [f"- `{c['model']}` seed {c['seed']}: differs in {', '.join(c['differs_in'])}"
                for c in result["other_recipe"]] + [""]
    return "\n".join(out)


def progress_markdown(rows: List[dict]) -> List[str]:
    if not rows:
        return []
    out = ["## In progress (not results)", "",
           "Cells still training when this report was built, from their work folders or committed carries: greedy "
           "validation BLEU of models that have not converged, beside the finished dense cells' validation "
           "BLEU (mean over their seeds) at the same update and at the same calibrated training time.", ""]

    def bleu(x):
        return "—" if x is None else f"{x:.2f}"
    out += table(["model", "seed", "last validation (updates)", "calibrated h", "valid BLEU (latest)", "best so far (at)",
                  "dense at the same updates", "dense at the same time", "attempts"],
                 [[r["model"], str(r["seed"]), f"{r['latest']['updates']:,}",
                   "—" if r["calibrated_s"] is None else f"{r['calibrated_s'] / 3600:.2f}", bleu(r["latest"]["bleu"]),
                   f"{r['best']['bleu']:.2f} ({r['best']['updates']:,})", bleu(r["dense_same_updates"]),
                   bleu(r["dense_same_time"]), str(r["attempts"])] for r in rows])
    return out


def paired_markdown(paired: Optional[dict]) -> List[str]:
    if paired is None:
        return []
    out = ["## Paired bootstrap on the test sentences", "",
           f"sacreBLEU's paired bootstrap resampling ({paired['resamples']:,} resamples) of one cell against "
           "another: test-set noise for those two training runs, beside the seeds' spread above (training "
           "noise). p: the probability of a difference at least this large by the choice of test sentences "
           "alone. ± : each system's 95% confidence interval.", ""]
    out += table(["difference", "view", "seeds", "BLEU", "Δ BLEU", "p"],
                 [[r["difference"], r["view"].replace("_", " "), " vs ".join(map(str, r["seeds"])),
                   f"{r['bleu'][0]:.2f} ± {r['ci'][0]:.2f} vs {r['bleu'][1]:.2f} ± {r['ci'][1]:.2f}",
                   f"{r['delta']:+.2f}", f"{r['p']:.4f}"] for r in paired["rows"]]) if paired["rows"] else \
        ["No pair of finished cells has committed translations yet.", ""]
    if paired["without_translations"]:
        out += ["Scored before translations were committed (not in these tests): "
                + ", ".join(paired["without_translations"]) + ".", ""]
    return out


def cost_line(cost: dict) -> str:
    if "missing" in cost:
        return "not measured: " + cost["missing"]
    return ", ".join(f"{m} {c:.3f}" for m, c in cost["s_per_update"].items()) + " s/update"


def plot(cells: List[dict], result: dict, path: str):
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pooled = {(r["model"], r["seed"]) for r in result["cells"] if r["status"] == "ok"}
    names = list(result["models"])
    fig, (by_time, by_updates) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for c in cells:
        if (c["model"], c["seed"]) not in pooled or c.get("mode") != "converge":
            continue
        color = f"C{names.index(c['model']) % 10}"
        curve = [p for p in c["curve"] if p["bleu"] is not None]
        style = dict(color=color, linestyle=["-", "--", ":", "-."][(c["seed"] - 1) % 4], linewidth=1.2,
                     label=f"{c['model']} s{c['seed']}")
        cost = result["models"][c["model"]]["s_per_update"]
        if cost is not None:
            by_time.plot([p["updates"] * cost / 3600 for p in curve], [p["bleu"] for p in curve], **style)
            by_time.plot(c["best"]["updates"] * cost / 3600, c["best"]["valid_bleu"], "o", color=color)
        by_updates.plot([p["updates"] for p in curve], [p["bleu"] for p in curve], **style)
    costs = result["cost"].get("s_per_update") or {}
    for i, r in enumerate(result.get("in_progress") or []):
        color = names.index(r["model"]) if r["model"] in names else len(names) + i
        style = dict(color=f"C{color % 10}", linestyle=":", linewidth=1.0,
                     label=f"{r['model']} s{r['seed']} (running)")
        if costs.get(r["model"]):
            by_time.plot([p["updates"] * costs[r["model"]] / 3600 for p in r["curve"]],
                         [p["bleu"] for p in r["curve"]], **style)
        by_updates.plot([p["updates"] for p in r["curve"]], [p["bleu"] for p in r["curve"]], **style)
    dense = result["models"].get("dense", {}).get("best", {}).get("cost_s", {})
    if dense.get("n"):
        by_time.axvline(dense["mean"] / 3600, color="gray", linestyle="--", linewidth=0.8)
    if "missing" in result["cost"]:
        by_time.text(0.5, 0.5, "no cost calibration yet\n(quality.py --converge --measure-cost)",
                     ha="center", va="center", transform=by_time.transAxes)
    by_time.set_xlabel("calibrated training time (hours: updates x seconds per update, cost.json)")
    by_updates.set_xlabel("updates")
    by_time.set_ylabel("validation BLEU (greedy)")
    by_time.set_title("validation BLEU vs training time\n(dot: best checkpoint; dashed: dense's time to best)")
    by_updates.set_title("validation BLEU vs updates")
    for ax in (by_time, by_updates):
        ax.grid(alpha=0.3)
    if by_updates.lines:
        by_updates.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_files.replacing(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def build(out_dir: str, order: List[str], settings: dict, work_dir: Optional[str] = None) -> dict:
    """Read ``out_dir/cells`` and write ``convergence.md``, ``convergence.json``, ``convergence.png``;
    with ``work_dir``, the unfinished cells' progress too (``convergence_progress``)."""
    cells = load_cells(os.path.join(out_dir, "cells"))
    costs, missing = training_cost.load(out_dir, settings)
    result = summarize(cells, order, settings, costs, missing)
    pooled = {(r["model"], r["seed"]) for r in result["cells"] if r["status"] == "ok"}
    result["paired"] = paired_significance.tests(out_dir, [c for c in cells if (c["model"], c["seed"]) in pooled],
                                                 PAIRS, PAIRED_VIEWS)
    dense_curves = [c["curve"] for c in cells if c["model"] == "dense" and (c["model"], c["seed"]) in pooled]
    result["in_progress"] = convergence_progress.compared_with_dense(
        convergence_progress.unfinished(work_dir, out_dir), dense_curves, costs)
    atomic_files.write_text(os.path.join(out_dir, "convergence.md"), markdown(result))
    atomic_files.write_json(os.path.join(out_dir, "convergence.json"), result)
    plot(cells, result, os.path.join(out_dir, "convergence.png"))
    return result

