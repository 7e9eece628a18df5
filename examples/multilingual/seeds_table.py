"""Several seeds of ``make multilingual`` as one table: each model's mean BLEU over directions per
seed, its mean and spread over seeds, the per-direction means, and every model against the first
(THOR by default) seed by seed.

    python seeds_table.py SEED1/bleu.json SEED2/bleu.json --out benchmarks/results/multilingual/seeds

Each ``bleu.json`` is one run's ``bleu_table.py`` output. Runs are pooled only when they scored the
same models on the same directions with the same test sentences: a run on another corpus would
make the spread mean nothing.
"""
import argparse
import json
import statistics
import sys
from typing import Dict, List


def load(paths: List[str]) -> List[dict]:
    runs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        missing = sorted({"metric", "models", "bleu", "mean", "test_sentences"} - set(run))
        if missing:
            raise ValueError(f"{path}: not a bleu_table.py result (no {', '.join(missing)})")
        runs.append(run)
    for i, run in enumerate(runs):  # one run given twice would halve the spread it reports
        for j in range(i):
            if runs[j]["bleu"] == run["bleu"]:
                raise ValueError(f"{paths[i]} and {paths[j]} hold the same scores: the same run twice?")
    first = runs[0]
    for path, run in zip(paths[1:], runs[1:]):
        for key in ("models", "test_sentences", "metric"):
            if run[key] != first[key]:
                raise ValueError(f"{path}: its {key} ({run[key]}) differ from {paths[0]}'s ({first[key]}); "
                                 "only runs of the same corpus, models and metric are pooled")
    return runs


def spread(values: List[float]) -> Dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": round(statistics.mean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def pool(runs: List[dict]) -> dict:
    models = runs[0]["models"]
    reference = models[0]
    directions = list(runs[0]["bleu"])
    per_direction = {d: {m: round(statistics.mean(r["bleu"][d][m] for r in runs), 2) for m in models}
                     for d in directions}
    deltas = {m: [round(r["mean"][reference] - r["mean"][m], 2) for r in runs] for m in models[1:]}
    return {
        "metric": runs[0]["metric"], "models": models, "runs": len(runs),
        "test_sentences": runs[0]["test_sentences"],
        "mean_by_seed": {m: [r["mean"][m] for r in runs] for m in models},
        "mean": {m: spread([r["mean"][m] for r in runs]) for m in models},
        "bleu": per_direction,
        f"{reference}_minus": {m: {"by_seed": d, **spread(d)} for m, d in deltas.items()},
        # directions where the reference model leads, in the seed-averaged table
        f"{reference}_leads_on": {m: sum(row[reference] > row[m] for row in per_direction.values())
                                  for m in models[1:]},
    }


def markdown(result: dict) -> str:
    models = result["models"]
    reference = models[0]
    out = [f"{result['runs']} seeds; {result['metric']}", "",
           "| model | mean BLEU by seed | mean ± std over seeds | "
           f"{reference} − model by seed | {reference} − model, mean ± std | directions {reference} leads |",
           "|---|---|---:|---|---:|---:|"]
    for m in models:
        by_seed = ", ".join(f"{v:.2f}" for v in result["mean_by_seed"][m])
        s = result["mean"][m]
        if m == reference:
            out.append(f"| {m} | {by_seed} | {s['mean']:.2f} ± {s['std']:.2f} | | | |")
            continue
        d = result[f"{reference}_minus"][m]
        out.append(f"| {m} | {by_seed} | {s['mean']:.2f} ± {s['std']:.2f} | "
                   f"{', '.join(f'{v:+.2f}' for v in d['by_seed'])} | {d['mean']:+.2f} ± {d['std']:.2f} | "
                   f"{result[f'{reference}_leads_on'][m]} of {len(result['bleu'])} |")
    out += ["", "Per direction, mean over seeds:", "",
            "| direction | sentences | " + " | ".join(models) + " |",
            "|---|---:|" + "---:|" * len(models)]
    for direction, row in result["bleu"].items():
        out.append(f"| {direction} | {result['test_sentences'][direction]} | "
                   + " | ".join(f"{row[m]:.2f}" for m in models) + " |")
    return "\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="bleu.json of each seed's run (the first model of the "
                                                "first run is compared with every other)")
    parser.add_argument("--out", required=True, help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    try:
        result = pool(load(args.runs))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = markdown(result)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
