"""Peak training memory of THOR against the number of experts E.

Experts should cost parameters and optimizer state (linear in E), not activations: only the chosen
expert runs for each sentence, so the memory a training step needs beyond its weights should stay
flat as E grows. For each E this runs one THOR training step (two stochastic passes +
consistency, Adam) in a fresh process and reports:

* static: parameters + gradients + Adam's two moments, 4 x the fp32 parameter bytes;
* peak: the process's peak memory during the steps minus its memory before the model was built
  (CPU: peak resident set size; CUDA: ``torch.cuda.max_memory_allocated``);
* beyond static: peak - static, i.e. activations and workspace.

    python benchmarks/memory.py                       # E = 1, 4, 16, 64 at d=256, 3+3 layers, CPU
    python benchmarks/memory.py --experts 1,4 --device cuda

Prints a table and writes benchmarks/results/memory.json.
"""
import argparse
import json
import os
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
from speed import add_size_args  # noqa: E402
from atomic_files import write_json  # noqa: E402


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_one(args) -> dict:
    """In this process: build THOR with ``args.num_experts``, train ``args.steps`` steps, report."""
    import torch

    from speed import DictTask, batch, build, synthetic_dictionary  # speed.py's models and batches

    from fairseq_thor.criterions.thor_consistency import ThorConsistencyCriterion

    torch.manual_seed(0)
    dictionary = synthetic_dictionary(args.vocab)
    sample = batch(dictionary, args, seed=0)
    cuda = args.device.startswith("cuda")
    before = torch.cuda.memory_allocated() if cuda else resident_bytes()
    model = build("thor_transformer", args, dictionary, ["--num-experts", str(args.num_experts)]).train()
    criterion = ThorConsistencyCriterion(DictTask(dictionary), False, 0.1, 1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for _ in range(args.steps):
        optimizer.zero_grad()
        loss, _, _ = criterion(model, sample)
        loss.backward()
        optimizer.step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"experts": args.num_experts, "param_bytes": params, "static_bytes": 4 * params,
            "peak_bytes": peak, "beyond_static_bytes": peak - 4 * params}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", default="1,4,16,64")
    add_size_args(p)  # speed.py's sizes and defaults
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-experts", type=int, help=argparse.SUPPRESS)  # the child's one E
    p.add_argument("--out", default=os.path.join(HERE, "results", "memory.json"))
    args = p.parse_args()
    if args.num_experts is not None:
        print(json.dumps(measure_one(args)))
        return

    rows = []
    for e in (int(x) for x in args.experts.split(",")):
        # a fresh process per E: a process's peak memory only ever grows
        child = [sys.executable, __file__, *sys.argv[1:], "--num-experts", str(e)]
        proc = subprocess.run(child, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"E={e} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"E={e:<4} params {r['param_bytes'] / 2**20:8.1f} MiB   static {r['static_bytes'] / 2**20:8.1f} MiB"
              f"   peak {r['peak_bytes'] / 2**20:8.1f} MiB   beyond static {r['beyond_static_bytes'] / 2**20:8.1f} MiB",
              flush=True)
    config = {k: v for k, v in vars(args).items() if k != "num_experts"}
    write_json(args.out, {"config": config, "rows": rows})  # never half a file
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
