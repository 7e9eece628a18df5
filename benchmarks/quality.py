"""Multi-seed quality study: dense, R-Drop, THOR (E=2, E=4), Switch and hash on one recipe, each
(model, seed) cell seen at equal updates and at equal training time.

One seed cannot separate THOR from its baselines (README, `make compare`). This script trains every
cell of a plan through the plugin's CLIs with the same recipe, decodes the test split with beam 5
(``--task translation_thor``: every sentence) and scores it with detokenized sacreBLEU (BLEU, chrF2).
One training run gives both views: the final checkpoint (equal updates), and for the two-pass
models -- R-Drop (fairseq's ``label_smoothed_cross_entropy_with_rdrop``) and THOR, which run two
forward/backward passes per update -- the last checkpoint (one every --save-every updates) trained
within the time the one-pass dense model took for the same seed (equal training time). Dense runs
first for each seed; a cell whose dense is not finished decodes every checkpoint, and the report
picks the right one later. Report: OUT/quality.md, quality.json, quality.png (BLEU against
training time), rebuilt after every cell (and by --report-only) from whatever cells exist.

    python benchmarks/quality.py                       # default plan, gettext de->en corpus (make demo's)
    python benchmarks/quality.py --models dense,thor2 --seeds 1,2,3,4,5
    python benchmarks/quality.py --report-only
    python benchmarks/quality.py --device cuda --fp16  # the same study on a GPU
    python benchmarks/quality.py --toy --data TOY_BIN  # a tiny model for ~10 updates (tests)
    python benchmarks/quality.py --converge            # to convergence, cell by cell (README)
    python benchmarks/quality.py --converge --measure-cost  # s/update of each model, side by side
    python benchmarks/quality.py --converge --pack     # unfinished cells into OUT/carry/, to commit

Default plan (--plan): seeds 1-3 for dense, rdrop, thor2, switch and hash, seed 1 for thor4,
run seed by seed with dense first; --models picks some, --seeds gives every model the same seeds.
Recipe (each a flag): make demo's, which was chosen by measurement (examples/demo/README.md):
3+3 pre-norm layers, d=256, FFN 512, 4 heads, shared embeddings, 8k joint sentencepiece, Adam
(0.9, 0.98), inverse_sqrt, lr 2e-3, warmup 200, dropout 0.1, weight decay 1e-4, label smoothing
0.1, 2,048 tokens per batch, no clipping, 1,000 updates; experts in every other layer, one per
token for every model (the same active parameters per token; the cells record the counts).

Resumable: each cell is written to OUT/cells/<model>-seed<S>.json (atomically) as soon as it is
done; a rerun skips finished cells (--rerun retrains them), retries failed ones and retrains a cell
recorded with another recipe. A failing cell is written with its error, the others still run, and
the script exits 1. Checkpoints and logs go to WORK/cells/<model>-seed<S>/, removed once the
cell is written unless --keep (a failed cell's logs stay); checkpoints are saved without optimizer
state, up to ~1.1 GB per cell (thor4: ~22 files of ~51 MB). With --converge a finished cell keeps
the checkpoints its views were decoded from (best, averaged, equal time) and its logs, and its test
translations go to OUT/translations/ beside the cell file. Two processes may run the same plan at
once (one per core, --threads 1 each): each claims the cell it trains (benchmarks/cell_claim.py)
and skips the cells the other holds.

Cost on 2 CPU cores with --threads 1 (tuning runs of this recipe, one neighbour job): ~1.1 s per
update for a one-pass model and ~2.7 s for THOR, i.e. ~20 and ~45 minutes per cell with
validation and decoding; the default plan (7 one-pass, 7 two-pass cells) ~7.5 hours, spread over
sittings. The progress lines give an ETA from the cells already finished (with --converge: the
finished cells' updates, less what each unfinished cell has trained, at the calibrated cost).
"""
import argparse
import os
import shlex
import sys
import time
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import fairseq_logs as logs  # noqa: E402
import quality_report  # noqa: E402
from cli_runs import DATA_LAYOUT, build_corpus, child_env, count_sentences, data_problem  # noqa: E402
import convergence_report  # noqa: E402
import training_cost  # noqa: E402
from cell_claim import holder, try_claim, waiting_for_claim  # noqa: E402
from convergence_cells import (converge_recipe, needs_rescoring, pack_cell, run_converge_cell,  # noqa: E402
                               updates_logged, without_threads, time_left as converge_time_left)
from quality_cells import (MODELS, SETTINGS, cell_path, finished, host_info, read_cell, recipe,  # noqa: E402
                           recipe_change, run_cell)

PLAN = "dense:3,rdrop:3,thor2:3,switch:3,thor4:1,hash:3"  # model:seeds (1..n)
# make demo's recipe (examples/demo/README.md: chosen by measurement), run to 1,000 updates
DEFAULTS = dict(layers=3, embed_dim=256, ffn_dim=512, heads=4, max_update=1000, save_every=50,
                max_tokens=2048, warmup=200, vocab=8000, threads=None)
TOY = dict(layers=2, embed_dim=32, ffn_dim=64, heads=2, max_update=10, save_every=5,
           max_tokens=1000, warmup=5, vocab=8000, threads=1)
FLOATS = dict(lr=2e-3, dropout=0.1, weight_decay=1e-4, label_smoothing=0.1, clip_norm=0.0,
              consistency_alpha=1.0, rdrop_alpha=1.0, capacity_factor=1.0)
# --converge: train each cell until validation BLEU stops improving (README, "Quality at
# convergence": the recipe was chosen from the dense pilot), what changes from the defaults above
# R-Drop is trained as rdropf (its objective through thor_consistency: fairseq's loss and gradients
# for the same dropout masks, tests/test_criterion.py) at ~2x dense per update instead of fairseq's
# criterion at ~3.3-4x; --plan rdrop:1 adds fairseq's own criterion as a cross-check (README)
# best-thor:2 is the second seed of the best THOR setting (issue 19), decided by the plan itself
CONVERGE_PLAN = "dense:2,rdropf:2,hash:2,switch:1,thor2:1,thor2a5:1,thor4:1,thor8:1,best-thor:2"
BEST_THOR = "best-thor"
# --converge runs a seed's cells in this order (the 1,000-update study keeps MODELS' order): each cell
# takes several sittings, so the comparisons the targets name come first -- THOR E=2 against dense,
# hash and R-Drop, then E=4 against E=2 -- then the paper's alpha, Switch (the multilingual target's
# baseline, no bilingual target), E=8 ("if the budget allows"), and fairseq's own R-Drop criterion
# (a cross-check of rdropf, not in the default plan)
CONVERGE_ORDER = ["dense", "thor2", "hash", "rdropf", "thor4", "thor2a5", "switch", "thor8", "rdrop"]
CONVERGE = dict(max_update=30000, save_every=250, dropout=0.3, patience=8, average=5, pack_every=30)
TOY_CONVERGE = dict(max_update=40, save_every=5, patience=2, average=2)
COST = dict(cost_rounds=2, cost_warm=25, cost_timed=75)  # --measure-cost: updates not timed, then timed
TOY_COST = dict(cost_rounds=2, cost_warm=3, cost_timed=6)
CONVERGE_SETTINGS = SETTINGS + ["patience", "average"]


def fail(message: str):
    """One line on stderr and exit 2 (argparse's usage block would bury it)."""
    print(f"quality.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def short(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def eta(args, todo: List[tuple]) -> str:
    """Remaining time for ``todo`` cells from the durations of the finished ones (same model when
    there are any, else all); with --converge, from the calibrated cost of what is left to train."""
    if args.converge:
        left = converge_time_left(args, todo, settings(args))
        if "missing" in left:
            return f"ETA {left['missing']}; {n_cells(len(todo))} to run"
        threads = f"--threads {left['threads']}" if left["threads"] else "torch's default threads"
        return (f"ETA {hms(left['seconds'])} for {n_cells(len(todo))} at the calibrated speed "
                f"({threads} on idle cores, ~{left['updates_per_cell']:,.0f} updates a cell)")
    done = [c for c in quality_report.load_cells(os.path.join(args.out, "cells")) if c["status"] == "ok"]
    if not done:
        return f"ETA after the first cell; {n_cells(len(todo))} to run"
    mean = sum(c["elapsed_s"] for c in done) / len(done)
    per_model = {}
    for c in done:
        per_model.setdefault(c["model"], []).append(c["elapsed_s"])
    total = sum(sum(per_model[m]) / len(per_model[m]) if m in per_model else mean for m, _ in todo)
    return f"ETA {hms(total)} for {n_cells(len(todo))}"


def n_cells(n: int) -> str:
    return f"{n} cell{'' if n == 1 else 's'}"


def plan_cells(args) -> List[tuple]:
    """(model, seed) in running order: seed by seed, dense first (with --converge, CONVERGE_ORDER)."""
    counts, best_thor_seeds = {}, None
    for item in args.plan.split(","):
        name, _, n = item.strip().partition(":")
        if name == BEST_THOR and n.isdigit():
            best_thor_seeds = int(n)
            continue
        if name not in MODELS or not n.isdigit():
            fail(f"--plan: {item.strip()!r} is not MODEL:SEEDS with MODEL one of {', '.join(MODELS)}"
                 f" (or {BEST_THOR}:SEEDS with --converge)")
        counts[name] = int(n)
    if best_thor_seeds and not args.report_only:  # a report trains nothing: no need to decide
        best = decided_best_thor(args, counts)
        if best:
            counts[best] = max(counts[best], best_thor_seeds)
    names = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else list(counts)
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        fail(f"--models: unknown model {', '.join(unknown) or '(none given)'}; valid names: {', '.join(MODELS)}")
    seeds = {m: args.seeds or list(range(1, counts.get(m, 1) + 1)) for m in names}
    order = CONVERGE_ORDER if args.converge else MODELS
    return [(m, s) for s in sorted({s for v in seeds.values() for s in v})
            for m in order if m in seeds and s in seeds[m]]


def decided_best_thor(args, counts: dict) -> Optional[str]:
    """The plan's ``best-thor:N``: the THOR setting the report calls best (highest mean validation
    BLEU), once every THOR setting in the plan has a scored cell of this recipe. Before that it
    plans nothing and says what it waits for, so the usual command trains the best setting's extra
    seeds in a later sitting without anyone choosing by hand (or by test BLEU)."""
    planned = [m for m in convergence_report.THOR_ROWS if m in counts]
    if not args.converge or not planned:
        fail(f"--plan {BEST_THOR}: needs --converge and THOR settings in the plan "
             f"({', '.join(convergence_report.THOR_ROWS)})")
    cells = quality_report.load_cells(os.path.join(args.out, "cells"))
    models = convergence_report.summarize(cells, list(MODELS), settings(args))["models"]
    waiting = [m for m in planned if m not in models]
    if waiting:
        print(f"--plan {BEST_THOR}: decided once {', '.join(planned)} are scored (waiting for {', '.join(waiting)})",
              flush=True)
        return None
    best = convergence_report.best_thor({m: models[m] for m in planned})
    print(f"--plan {BEST_THOR}: {best}, the highest mean validation BLEU of {', '.join(planned)}", flush=True)
    return best


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help=f"{DATA_LAYOUT} (default: build make demo's gettext de->en corpus)")
    p.add_argument("--converge", action="store_true",
                   help="train every cell until validation BLEU stops improving (--patience, capped at "
                        "--max-update), score the best and the averaged checkpoint; sets "
                        f"{CONVERGE} (toy: {TOY_CONVERGE}) and its own plan, --work and --out")
    p.add_argument("--plan", help=f"model:number-of-seeds list, seeds 1..n (default {PLAN}; "
                                  f"with --converge {CONVERGE_PLAN})")
    p.add_argument("--models", help=f"run only these (comma-separated; of {', '.join(MODELS)})")
    p.add_argument("--seeds", help="e.g. 1,2,3: every model gets these seeds instead of the plan's")
    p.add_argument("--toy", action="store_true", help=f"tiny model for tests, needs --data (sets {TOY})")
    for key, value in DEFAULTS.items():
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                       help=f"default {value} ({TOY[key]} with --toy)" +
                            ("; checkpoint, validate and log every K updates" if key == "save_every" else ""))
    p.add_argument("--normalize-before", action=argparse.BooleanOptionalAction, default=True,
                   help="pre-norm layers, as make demo (default on; --no-normalize-before: post-norm)")
    for key, value in FLOATS.items():
        p.add_argument("--" + key.replace("_", "-"), type=float, default=None,
                       help=f"default {value}" + (f" ({CONVERGE[key]} with --converge)" if key in CONVERGE else ""))
    p.add_argument("--patience", type=int, default=None,
                   help=f"--converge: stop after this many validations without a better BLEU "
                        f"(default {CONVERGE['patience']})")
    p.add_argument("--average", type=int, default=None,
                   help=f"--converge: average the last N checkpoints (default {CONVERGE['average']})")
    p.add_argument("--measure-cost", action="store_true",
                   help="--converge: instead of training cells, measure every planned model's seconds per "
                        "update side by side (benchmarks/training_cost.py) into OUT/cost.json, which the "
                        "equal-training-time view and the time axis use")
    for key, value in COST.items():
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                       help=f"--measure-cost: default {value} ({TOY_COST[key]} with --toy)")
    p.add_argument("--pack", action="store_true",
                   help="--converge: instead of training, pack every started, unscored cell of the plan into "
                        "OUT/carry/ (benchmarks/convergence_carry.py) to commit before a session ends; safe "
                        "while the cells train")
    p.add_argument("--pack-every", type=float, default=None, metavar="MINUTES",
                   help=f"--converge: also pack the cell being trained every MINUTES (default "
                        f"{CONVERGE['pack_every']:g}; 0: never)")
    p.add_argument("--consistency-alpha-warmup-updates", type=int, default=0,
                   help="THOR's; passed only when > 0 (default 0)")
    p.add_argument("--gated-experts", type=int, default=4, help="E for switch and hash (default 4)")
    p.add_argument("--extra", action="append", default=[], metavar="MODEL=FLAGS",
                   help="more fairseq-train flags for one model, e.g. 'thor2=--inference-routing token'")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--fp16", action="store_true", help="with --device cuda")
    p.add_argument("--remove-bpe", default="sentencepiece", help="fairseq-generate's, or 'none'")
    p.add_argument("--src", default="de", help="corpus source language (only when building it)")
    p.add_argument("--tgt", default="en")
    p.add_argument("--work", help="corpus, checkpoints, logs (default work/quality; work/convergence with --converge)")
    p.add_argument("--out", help="cells/ and the report (default benchmarks/results/quality; "
                                 "benchmarks/results/convergence with --converge)")
    p.add_argument("--rerun", action="store_true", help="retrain planned cells that are finished")
    p.add_argument("--keep", action="store_true", help="keep each cell's checkpoints and logs")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the cells")
    args = p.parse_args(argv)
    defaults = {**(TOY if args.toy else DEFAULTS), **FLOATS, "patience": None, "average": None, "pack_every": 0,
                **(TOY_COST if args.toy else COST)}
    if args.converge:
        defaults.update(CONVERGE, **(TOY_CONVERGE if args.toy else {}))
    elif any(v not in (None, False) for v in (args.patience, args.average, args.measure_cost, args.pack,
                                                args.pack_every)):
        fail("--patience, --average, --measure-cost, --pack and --pack-every belong to --converge")
    if args.converge and args.pack_every is not None and args.pack_every < 0:
        fail(f"--pack-every {args.pack_every}: minutes between packs, at least 0 (0: never)")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    study = "convergence" if args.converge else "quality"
    args.plan = args.plan or (CONVERGE_PLAN if args.converge else PLAN)
    args.work = args.work or os.path.join(REPO, "work", study)
    args.out = args.out or os.path.join(REPO, "benchmarks", "results", study)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else None
    except ValueError:
        fail(f"--seeds {args.seeds!r}: expected integers such as 1,2,3")
    args.cells = plan_cells(args)
    extra = {}
    for item in args.extra:
        name, _, flags = item.partition("=")
        if name not in MODELS:
            fail(f"--extra {item!r}: unknown model {name!r}; valid names: {', '.join(MODELS)}")
        extra[name] = extra.get(name, []) + shlex.split(flags)
    args.extra = extra
    if args.converge and (args.patience < 1 or args.average < 1):
        fail(f"--patience {args.patience} and --average {args.average} must be at least 1")
    wrong = [problem for bad, problem in (
        (args.cost_rounds < 1, f"--cost-rounds {args.cost_rounds} must be at least 1"),
        (args.cost_warm < 0, f"--cost-warm {args.cost_warm} must be at least 0"),
        (args.cost_timed < 3 or args.cost_timed % 3,
         f"--cost-timed {args.cost_timed} must be a positive multiple of 3 (it is logged in thirds)")) if bad]
    if wrong:
        fail("; ".join(wrong))
    if args.max_update % args.save_every:
        fail(f"--max-update {args.max_update} must be a multiple of --save-every {args.save_every}")
    if args.fp16 and args.device != "cuda":
        fail("--fp16 needs --device cuda")
    if args.toy and not args.data:
        fail("--toy needs --data (a small binarized corpus)")
    if args.data and not args.report_only:
        args.data = os.path.abspath(args.data)
        problem = data_problem(args.data)
        if problem:
            fail(f"--data {args.data}: {problem}; expected {DATA_LAYOUT}")
    args.work, args.out = os.path.abspath(args.work), os.path.abspath(args.out)
    return args


def settings(args) -> dict:
    """What every cell records of the study's arguments (the report's header and recipe)."""
    return {k: getattr(args, k, None) for k in (CONVERGE_SETTINGS if args.converge else SETTINGS)}


def build_report(args, order: List[str]) -> str:
    """Rebuild the report from the cell files; return its markdown."""
    if args.converge:
        return convergence_report.markdown(convergence_report.build(args.out, order, settings(args), args.work))
    return quality_report.markdown(quality_report.build(args.out, order))


def done_line(cell: dict) -> str:
    if cell.get("mode") == "converge":
        best, averaged, timed = cell["best"], cell["averaged"], cell["equal_time"]
        if "missing" in timed:
            at_time = timed["missing"]
        elif "budget_s" in timed:
            at_time = f"{timed['bleu']:.2f} at dense's {timed['budget_s']:.0f} calibrated s ({timed['updates']} updates)"
        else:
            at_time = "its best (the budget of the others)"
        return (f"best BLEU {best['bleu']:.2f} / chrF2 {best['chrf']:.2f} (update {best['updates']}), "
                f"averaged {averaged['bleu']:.2f}; stopped by {cell['stopped_by']} at {cell['updates']} "
                f"updates ({cell['train_s']:.0f} s training); equal time: {at_time}")
    timed, at_time = cell["equal_time"], ""
    if cell["two_pass"] and "missing" in timed:
        at_time = f"; equal time: {timed['missing']}"
    elif cell["two_pass"]:
        at_time = f"; {timed['bleu']:.2f} at dense's {timed['budget_s']:.0f} s ({timed['updates']} updates)"
    final = cell["equal_updates"]
    return (f"BLEU {final['bleu']:.2f}, chrF2 {final['chrf']:.2f} after {cell['updates']} updates "
            f"({cell['train_s']:.0f} s training){at_time}")


def measure_cost(args, env: dict) -> int:
    """--measure-cost: every planned model's seconds per update, side by side, into OUT/cost.json."""
    names = list(dict.fromkeys(name for name, _ in args.cells))
    print(f"measuring seconds per update of {', '.join(names)}: {args.cost_rounds} rounds of "
          f"{args.cost_warm} + {args.cost_timed} updates each, threads {args.threads or 'default'}", flush=True)
    measured = training_cost.measure(args, names, env, os.path.join(args.work, "cost"), args.cost_rounds,
                                     args.cost_warm, args.cost_timed)
    training_cost.write(args.out, measured, settings(args))
    for name, cost in measured["s_per_update"].items():
        ratio = (measured["relative_to_dense"] or {}).get(name)
        print(f"  {name:8s} {cost:.3f} s/update" + (f" ({ratio:.2f}x dense)" if ratio else ""), flush=True)
    print(f"wrote {os.path.join(short(args.out), training_cost.COST_FILE)}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(os.path.join(args.out, "cells"), exist_ok=True)
    order = list(MODELS)
    names = "convergence.md, .json, .png" if args.converge else "quality.md, quality.json, quality.png"
    if args.report_only:
        build_report(args, order)
        print(f"wrote {names} in {args.out}")
        return 0
    os.makedirs(args.work, exist_ok=True)
    args.reference_file = None
    with waiting_for_claim(args.work, "corpus"):  # a second process waits, then finds it built
        args.data = args.data or build_corpus(args)
    args.test_sentences = count_sentences(args.data)
    args.references = (f"the raw test text {args.reference_file}" if args.reference_file
                       else "fairseq-generate's T- lines")
    args.device_flags = ["--cpu"] if args.device == "cpu" else (["--fp16"] if args.fp16 else [])
    args.host = host_info(args)
    env = child_env(args.threads)
    if args.measure_cost:
        return measure_cost(args, env)
    if args.pack:
        return pack_started(args)

    if args.converge:
        args.cells = started_first(args, args.cells)
    start, failed, elsewhere = time.time(), [], []
    for i, (name, seed) in enumerate(args.cells, 1):
        label = f"{name}-seed{seed}"  # the cell's file and folder name
        claim = try_claim(args.work, label)
        if claim is None:  # the same command started again to use the other core (README)
            elsewhere.append(f"{name} seed {seed}")
            print(f"[{i}/{len(args.cells)}] skip {name} seed {seed}: another process is training it "
                  f"({holder(args.work, label)})", flush=True)
            continue
        with claim:
            cell = run_claimed_cell(args, i, name, seed, start, env)
        if cell is None:
            continue
        if cell["status"] != "ok":
            failed.append(f"{name} seed {seed}")
        build_report(args, order)

    print("\n" + build_report(args, order))
    print(f"wrote {names} in {args.out}; cells in {args.out}/cells")
    if elsewhere:
        print(f"not run here, another process holds them: {', '.join(elsewhere)} (that process reports them)")
    if failed:
        print(f"FAILED: {', '.join(failed)} (errors in the cell files and the report)", file=sys.stderr)
    return 1 if failed else 0


def pack_started(args) -> int:
    """--pack: every started, unscored cell of the plan into OUT/carry/ (one under the claim of the
    cells' own processes is packed all the same: its checkpoint_last.pt is read whole)."""
    packed = [c for c in args.cells if not finished(cell_path(args, *c)) and pack_cell(args, *c, settings(args))]
    print(f"packed {len(packed)} cell(s) into {short(os.path.join(args.out, 'carry'))}" +
          ("; commit that folder before the session ends" if packed else
           " (none of the plan's unscored cells has a checkpoint_last.pt)"), flush=True)
    return 0


def started_first(args, cells: List[tuple]) -> List[tuple]:
    """With --converge, the cells whose work folders have trained go first, the plan's order kept
    otherwise: a half-trained cell (e.g. the one another process trained until a session ended)
    finishes before a new one starts, so results land sooner and fewer checkpoint series wait on
    disk."""
    trained = {c: 0 if finished(cell_path(args, *c)) else updates_logged(args, *c) for c in cells}
    ordered = sorted(cells, key=lambda c: trained[c] == 0)
    if ordered != cells:
        print("resuming first: " + ", ".join(f"{m} seed {s} ({trained[(m, s)]:,} updates)"
                                             for m, s in ordered if trained[(m, s)]), flush=True)
    return ordered


def run_claimed_cell(args, i: int, name: str, seed: int, start: float, env: dict) -> Optional[dict]:
    """Train (or rescore) the i-th cell, which this process holds the claim on; None when it was
    already finished. The cell file is read under the claim: another process may have finished it
    a moment ago."""
    tag, path = f"[{i}/{len(args.cells)}]", cell_path(args, name, seed)
    recipe_of = converge_recipe if args.converge else recipe
    old = read_cell(path)
    if old and old["status"] == "ok" and not args.rerun:
        recorded = without_threads(old.get("recipe")) if args.converge else old.get("recipe")
        change = recipe_change(recorded, recipe_of(args, name, seed))
        if change is None and args.converge and needs_rescoring(args, old, settings(args)):
            print(f"{tag} rescore {name} seed {seed}: its equal-time view was missing "
                  f"({old['equal_time']['missing']})", flush=True)
        elif change is None:
            print(f"{tag} skip {name} seed {seed}: finished ({short(path)})", flush=True)
            return None
        else:
            print(f"{tag} retrain {name} seed {seed}: recorded with another recipe ({change})", flush=True)
    todo = [c for c in args.cells[i - 1:] if args.rerun or c == (name, seed) or not finished(cell_path(args, *c))]
    print(f"{tag} start {name} seed {seed} at {time.strftime('%H:%M:%S')} (elapsed {hms(time.time() - start)}; "
          f"{eta(args, todo)})", flush=True)
    if args.converge:
        cell = run_converge_cell(args, name, seed, env, settings(args))
    else:
        cell = run_cell(args, name, seed, env)
    if cell["status"] == "ok":
        took = f"(this attempt {hms(cell['elapsed_s'])})" if args.converge else f"in {hms(cell['elapsed_s'])}"
        print(f"{tag} done {name} seed {seed} {took}: {done_line(cell)}", flush=True)
    else:
        print(f"{tag} FAILED {name} seed {seed} after {hms(cell['elapsed_s'])}: "
              f"{logs.error_summary(cell['error'])}", file=sys.stderr, flush=True)
    return cell


if __name__ == "__main__":
    sys.exit(main())
