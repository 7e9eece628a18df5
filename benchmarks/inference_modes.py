"""Every way to decode a trained THOR model, scored on the test split: which to serve.

For each checkpoint (a model trained with E experts) the test split is decoded with beam 5 under
every ``--inference-routing`` mode -- ``sentence`` (the default: one random expert per sentence and
layer), ``token``, ``path`` (sentence routing with batches grouped by expert), ``fixed`` with each
expert K, ``mean`` (all E experts' outputs averaged: E times the FFN cost) and ``merged`` (the
experts' weights averaged) -- and as the single-expert dense export (``fairseq-thor-export-dense
--expert 0``) with stock fairseq-generate, whose hypotheses are checked to equal ``fixed`` 0.
Recorded per decoding: BLEU and chrF2 (detokenized sacreBLEU against the raw references) and
fairseq's own decoding time. The report gives every checkpoint's row and, per E, the mean and
spread over seeds, plus each single expert's spread (the best and the worst expert of a model).

    python benchmarks/inference_modes.py --data work/quality/data/data-bin-8000 \\
        --references work/quality/data/raw/test.en --checkpoint thor2-seed1=PATH --checkpoint ...

Writes benchmarks/results/inference-modes/modes.json and modes.md (``--out``). A run adds its models
to what ``--out`` already holds, and the report pools every model of one E: one ``--out`` is one
study (the converged models go to benchmarks/results/convergence/inference-modes/, not beside the
1,000-update ones). A name already there from another checkpoint, or another test split, is refused
(``--replace`` decodes the name again).
"""
import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from atomic_files import write_json, write_text  # noqa: E402
from cli_runs import BIN, child_env, count_sentences, decode, run, scratch_root  # noqa: E402

MODES = ["sentence", "token", "path", "mean", "merged"]  # plus fixed-K for every expert, and the export


def num_experts(checkpoint: str) -> int:
    import torch

    from cli_runs import quiet_plugin_import

    quiet_plugin_import()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cfg = state["cfg"]["model"]
    return int(getattr(cfg, "num_experts", None) or cfg["num_experts"])


def decode_all(args, name: str, checkpoint: str, work: str, env: dict) -> dict:
    experts = num_experts(checkpoint)
    rows = {}

    def scored(label, extra=(), path=checkpoint, plugin=True):
        result = decode(args, path, os.path.join(work, f"{name}-{label}.log"), env, extra, plugin)
        print(f"    {name} {label}: BLEU {result['bleu']:.2f}, chrF2 {result['chrf']:.2f}, "
              f"{result['decode_s']:.1f} s", flush=True)
        return {k: result[k] for k in ("bleu", "chrf", "length_ratio", "decode_s", "sentences")}

    for mode in MODES:
        rows[mode] = scored(mode, ["--inference-routing", mode])
    for k in range(experts):
        rows[f"fixed-{k}"] = scored(f"fixed-{k}", ["--inference-routing", "fixed", "--inference-expert", str(k)])
    export = os.path.join(work, f"{name}-export0.pt")
    run([os.path.join(BIN, "fairseq-thor-export-dense"), checkpoint, "--out", export, "--expert", "0"],
        os.path.join(work, f"{name}-export.log"), env=env)
    rows["export-0 (stock fairseq)"] = scored("export-0", path=export, plugin=False)
    same = (hypotheses(os.path.join(work, f"{name}-export-0.log"))
            == hypotheses(os.path.join(work, f"{name}-fixed-0.log")))
    os.remove(export)
    return {"checkpoint": checkpoint, "num_experts": experts, "modes": rows, "export_equals_fixed_0": same}


def hypotheses(log: str) -> Dict[int, str]:
    with open(log, encoding="utf-8") as f:
        return {int(m.group(1)): m.group(2) for m in re.finditer(r"^H-(\d+)\t\S+\t(.*)$", f.read(), re.M)}


def mean_std(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown(result: dict) -> str:
    out = ["# Inference modes of trained THOR models", "",
           f"Test split ({result['test_sentences']} sentences), beam 5, max length 1.5 x source + 10, detokenized "
           f"sacreBLEU; decode s: fairseq's own timer (generation only), threads {result['threads'] or 'default'}.", ""]
    by_e: Dict[int, List[dict]] = {}
    for cell in result["checkpoints"].values():
        by_e.setdefault(cell["num_experts"], []).append(cell)
    for e, cells in sorted(by_e.items()):
        labels = [m for m in cells[0]["modes"]]
        out += [f"## E = {e} ({len(cells)} model{'s' if len(cells) > 1 else ''}: mean ± std over them)", "",
                "| mode | BLEU | chrF2 | decode s | hyp/ref length |", "|---|---|---|---|---|"]
        for label in labels:
            rows = [c["modes"][label] for c in cells]
            out.append(f"| {label} | {mean_std([r['bleu'] for r in rows])} | {mean_std([r['chrf'] for r in rows])} | "
                       f"{mean_std([r['decode_s'] for r in rows])} | {mean_std([r['length_ratio'] for r in rows])} |")
        best = [max(c["modes"][f"fixed-{k}"]["bleu"] for k in range(e)) for c in cells]
        worst = [min(c["modes"][f"fixed-{k}"]["bleu"] for k in range(e)) for c in cells]
        out += ["", f"Single experts: best {mean_std(best)}, worst {mean_std(worst)} BLEU (per model, then over "
                    f"models). The export's hypotheses equal fixed-0's: "
                    f"{', '.join(str(c['export_equals_fixed_0']) for c in cells)}.", ""]
    out += ["## Every model", "", "| model | " + " | ".join(MODES) + " | fixed (each expert) | export-0 |",
            "|---|" + "---|" * (len(MODES) + 2)]
    for name, c in result["checkpoints"].items():
        fixed = " / ".join(f"{c['modes'][f'fixed-{k}']['bleu']:.2f}" for k in range(c["num_experts"]))
        out.append(f"| {name} | " + " | ".join(f"{c['modes'][m]['bleu']:.2f}" for m in MODES) +
                   f" | {fixed} | {c['modes']['export-0 (stock fairseq)']['bleu']:.2f} |")
    return "\n".join(out) + "\n"


def refused_mix(result: dict, sentences: int, checkpoints: Dict[str, str], replace: bool) -> List[str]:
    """Why these checkpoints may not join the results already in --out (empty when they may)."""
    if not result["checkpoints"]:
        return []
    problems = []
    if result.get("test_sentences") != sentences:
        problems.append(f"it holds decodings of a {result.get('test_sentences')}-sentence test split, --data's has "
                        f"{sentences}: decode into another --out")
    for name, path in checkpoints.items():
        old = result["checkpoints"].get(name, {}).get("checkpoint")
        if old is not None and os.path.abspath(old) != os.path.abspath(path) and not replace:
            problems.append(f"it holds {name} from {old}, not {path}: give another name, another --out, "
                            f"or --replace to decode {name} again from the new checkpoint")
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the binarized data (its test split is decoded)")
    p.add_argument("--references", help="raw test targets (default: fairseq's T- lines)")
    p.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--remove-bpe", default="sentencepiece")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "inference-modes"),
                   help="results folder; models are added to what it holds and pooled by E (one folder, one study)")
    p.add_argument("--replace", action="store_true",
                   help="a name --out already holds from another checkpoint is decoded again (refused otherwise)")
    args = p.parse_args(argv)
    args.seed, args.device_flags, args.reference_file = 1, ["--cpu"], args.references
    unnamed = [item for item in args.checkpoint if "=" not in item]
    if unnamed:
        p.error(f"--checkpoint takes NAME=PATH (the name labels its rows), got: {', '.join(unnamed)}")
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    missing = [path for path in checkpoints.values() if not os.path.isfile(path)]
    if missing:
        p.error(f"no such checkpoint: {', '.join(missing)}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "modes.json")
    result = json.load(open(path)) if os.path.exists(path) else {"checkpoints": {}}
    sentences = count_sentences(args.data)
    problems = refused_mix(result, sentences, checkpoints, args.replace)
    if problems:
        p.error(f"--out {args.out}: " + "; ".join(problems))
    result.update(test_sentences=sentences, threads=args.threads)
    env = child_env(args.threads)
    with tempfile.TemporaryDirectory(dir=scratch_root()) as work:
        for name, checkpoint in checkpoints.items():
            print(f"==> {name}: {checkpoint}", flush=True)
            result["checkpoints"][name] = decode_all(args, name, checkpoint, work, env)
            write_json(path, result)  # each model as soon as it is done, never half a file
            write_text(os.path.join(args.out, "modes.md"), markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
