"""Dense vs THOR vs gated MoE (Switch top-1, GShard top-2, hash) trained the same way, side by side.

THOR (Zuo et al., ICLR 2022) claims that random routing with a consistency loss matches or beats a
trained gate. This script trains every model through the plugin's real CLIs on the same binarized
data, with the same seed, sizes and number of updates, decodes the test split (beam 5) and writes

* ``OUT/compare.md`` and ``OUT/compare.json``: BLEU, chrF2, last validation loss, total params,
  active params per token, training words/s, decoding tokens/s (plus, for the gated routers, the
  last training ``aux_loss``, ``expert_load_max``, ``dropped``, ``gate_entropy``);
* ``OUT/valid_loss.png``: validation loss over updates, one line per model.

    python benchmarks/compare.py                      # gettext de->en corpus built like `make demo`
    python benchmarks/compare.py --data data-bin --models dense,thor --max-update 2000
    python benchmarks/compare.py --toy --data TOY_BIN # a tiny model for ~10 updates (tests)

Defaults: the demo's model and optimiser (3+3 layers, d=256, FFN 512, lr 3e-3, 2048 tokens per
batch) with E=4 experts in every other layer, 700 updates per model (about 2 epochs), validation
every 50. Estimated at ~50 minutes for the five models on an idle 2-core CPU: 20-update probes
(one thread, the other core busy) cost dense 1.0 s/update, THOR 2.15 (two passes), Switch 0.95,
GShard 1.35, hash 1.0; the demo's THOR runs at 1.22 s/update on two idle cores, so the sum scales
to ~3.7 s per update of all five, ~43 minutes, plus ~2 s per validation, ~20 s of decoding per
model and ~35 s to build the corpus. On a machine shared with another job pass ``--threads 1``
(two torch threads fighting for one free core run many times slower); expect ~80 minutes.

A model that fails (e.g. a router the plugin does not have) is marked failed with its error, the
others still run, and the script exits 1 at the end. Speeds are measured one model at a time:
run on an otherwise idle machine to compare them.
"""
import argparse
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import compare_report as report  # noqa: E402
from cli_runs import (BIN, GATED, USER_DIR, build_corpus, child_env, count_params, decode,  # noqa: E402
                      model_flags, run, step)

# name -> (training flags after the model's sizes, experts per token in an expert layer)
MODELS = {
    "dense": (["--criterion", "label_smoothed_cross_entropy"], 1),
    "thor": (["--criterion", "thor_consistency", "--consistency-alpha", "{alpha}"], 1),
    "switch": (["--expert-router", "switch", *GATED], 1),
    "gshard": (["--expert-router", "gshard", *GATED], 2),
    "hash": (["--expert-router", "hash", *GATED], 1),
}
DEFAULTS = dict(layers=3, embed_dim=256, ffn_dim=512, heads=4, num_experts=4, max_update=700,
                validate_every=50, max_tokens=2048, warmup=100, threads=None)
TOY = dict(layers=2, embed_dim=32, ffn_dim=64, heads=2, num_experts=4, max_update=10,
           validate_every=5, max_tokens=1000, warmup=5, threads=1)


def train_command(args, name: str, save_dir: str) -> list:
    flags, _ = MODELS[name]
    return [str(arg) for arg in [
        os.path.join(BIN, "fairseq-train"), args.data, "--user-dir", USER_DIR, *args.device_flags,
        "--task", "translation_thor", *model_flags(args, 1 if name == "dense" else args.num_experts),
        *(flag.format(alpha=args.alpha, capacity_factor=args.capacity_factor) for flag in flags), "--label-smoothing", "0.1",
        # the demo's optimisation settings
        "--dropout", "0.1", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
        "--lr", args.lr, "--lr-scheduler", "inverse_sqrt", "--warmup-updates", args.warmup,
        "--max-tokens", args.max_tokens, "--max-update", args.max_update, "--seed", args.seed,
        # validate every K updates and at the end, not at epoch ends; save once, at the end
        "--validate-interval-updates", args.validate_every, "--validate-interval", 10**6,
        "--save-interval", 10**6, "--save-dir", save_dir, "--no-epoch-checkpoints",
        "--log-format", "simple", "--log-interval", args.validate_every,
    ]]


def compare_one(args, row: dict, env: dict):
    """Train, decode and score one model, filling ``row`` as it goes (a failure keeps what was
    measured); every number comes from the logs the CLIs wrote."""
    name, work = row["model"], row["work"]
    shutil.rmtree(work, ignore_errors=True)  # a rerun trains afresh instead of resuming
    os.makedirs(work)
    save_dir = os.path.join(work, "checkpoints")
    cmd = row["train_command"] = train_command(args, name, save_dir)
    start = time.time()
    train = report.parse_train_log(run(cmd, os.path.join(work, "train.log"), env=env,
                                       echo=report.progress))
    row["train_elapsed_s"] = round(time.time() - start, 1)
    row.update(train)
    row["valid_loss"] = train["valid_curve"][-1]["loss"] if train["valid_curve"] else None
    if train["num_updates"] != args.max_update:
        raise RuntimeError(f"trained {train['num_updates']} updates, not {args.max_update}")

    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    row.update(decode(args, checkpoint, os.path.join(work, "generate.log"), env))
    row.update(count_params(checkpoint, train["total_params"], 1 if name == "dense" else args.num_experts,
                            MODELS[name][1]))
    row["status"] = "ok"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="an existing fairseq data-bin (default: build the gettext corpus)")
    p.add_argument("--models", default="dense,thor,switch,gshard,hash",
                   help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--toy", action="store_true",
                   help=f"tiny model for a smoke test, needs --data (sets {TOY} unless given)")
    for key, value in DEFAULTS.items():
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                       help=f"default {value} ({TOY[key]} with --toy)")
    p.add_argument("--alpha", type=float, default=1.0, help="THOR --consistency-alpha (the demo's)")
    p.add_argument("--capacity-factor", type=float, default=1.0,
                   help="Switch/GShard --capacity-factor (Switch Transformer uses 1.0-1.25)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--remove-bpe", default="sentencepiece", help="fairseq-generate's, or 'none'")
    p.add_argument("--src", default="de", help="corpus source language (only when building it)")
    p.add_argument("--tgt", default="en")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--work", default=os.path.join(REPO, "work", "compare"),
                   help="corpus, checkpoints and logs")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "compare"),
                   help="compare.md, compare.json, valid_loss.png")
    args = p.parse_args(argv)
    for key, value in (TOY if args.toy else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models: unknown {unknown}; choose from {','.join(MODELS)}")
    if args.toy and not args.data:
        p.error("--toy needs --data (a small binarized corpus)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device_flags = ["--cpu"] if args.device == "cpu" else []
    env = child_env(args.threads)
    args.work, args.out = os.path.abspath(args.work), os.path.abspath(args.out)
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    args.reference_file = None
    args.data = os.path.abspath(args.data) if args.data else build_corpus(args)

    rows = []
    for i, name in enumerate(args.models, 1):
        step(f"{i}/{len(args.models)} {name}: training {args.max_update} updates, then decoding")
        row = {"model": name, "status": "failed", "error": None, "work": os.path.join(args.work, name)}
        try:
            compare_one(args, row, env)
            print(f"    BLEU {row['bleu']:.2f}, valid loss {row['valid_loss']}, "
                  f"{row['train_words_per_s']:.0f} train words/s, "
                  f"{row['decode_tokens_per_s']:.0f} decode tokens/s", flush=True)
        except Exception as e:  # keep going: the row says what broke
            print(f"    FAILED: {e}", file=sys.stderr, flush=True)
            row.update(status="failed", error=str(e))
        rows.append(row)

    config = {k: v for k, v in vars(args).items() if k not in ("device_flags", "reference_file")}
    config["references"] = (f"the raw test text {args.reference_file}" if args.reference_file
                            else "fairseq-generate's T- lines")
    result = {"config": config, "models": rows}
    paths = {ext: os.path.join(args.out, name) for ext, name in
             (("md", "compare.md"), ("json", "compare.json"), ("png", "valid_loss.png"))}
    table = report.markdown(result)
    with open(paths["md"], "w") as f:
        f.write(table)
    report.write_json(result, paths["json"])
    report.plot_valid_loss(result, paths["png"])
    print("\n" + table)
    print("wrote " + ", ".join(paths.values()))
    failed = [row["model"] for row in rows if row["status"] != "ok"]
    if failed:
        print(f"FAILED: {', '.join(failed)} (see the errors above and in the table)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
