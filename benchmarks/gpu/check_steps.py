"""The GPU check's steps, each under its own time limit, with one JSON of what they measured.

Called by benchmarks/gpu/check.sh once the plugin is installed. In order of what matters most if
time runs short:

1. ``cuda_tests``: ``pytest -m cuda`` (tests/test_cuda.py): routing, gates, consistency KL and
   criterion on CUDA in fp32/fp16/bf16 against the CPU fp32 result;
2. ``demo_fp16`` / ``demo_bf16``: ``make demo``'s script on the bundled corpus with ``--fp16`` /
   ``--bf16`` for a few hundred updates, decoding every test sentence: the loss and consistency
   must be finite and falling, and fp16's loss scaler must not loop on overflows;
3. ``speed_e4`` / ``speed_e16``: benchmarks/speed.py at a base-transformer size in fp16;
4. ``memory``: benchmarks/memory.py, peak training memory up to E = 64.

Each step's output goes to check.log; check.json is rewritten after every step, so a check cut
short still reports what finished. ``--rehearsal`` runs the same steps on the CPU at toy sizes
(CUDA-only steps reported as skipped, with the reason), so CI keeps this script working.
"""
import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE_SIZE = ["--embed-dim", "512", "--layers", "6", "--vocab", "32000", "--batch-size", "128", "--length", "30"]
TOY_SIZE = ["--embed-dim", "32", "--layers", "1", "--vocab", "300", "--batch-size", "4", "--length", "6"]
# the demo's own script, shortened: a few hundred updates on the GPU, a handful in the rehearsal
GPU_DEMO = {"MAX_UPDATE": "400", "LOG_INTERVAL": "25"}
TOY_DEMO = {"VOCAB": "600", "MAX_UPDATE": "6", "LOG_INTERVAL": "2", "LAYERS": "1", "EMBED": "32",
            "FFN": "64", "HEADS": "2", "MAX_TOKENS": "4000", "WARMUP": "2", "OMP_NUM_THREADS": "1"}
# fp16's dynamic loss scaler skips an update on overflow and halves the scale; a few at the start
# are its normal search, a steady stream is the loop this check is there to catch
MAX_OVERFLOW_SHARE = 0.05
MIN_STEP_S = 20  # a step with less time than this left is skipped ("out of time"), not started


class Check:
    def __init__(self, args):
        self.args, self.out = args, args.out
        self.start = time.time()
        self.log_path = os.path.join(self.out, "check.log")
        self.report = {"rehearsal": args.rehearsal, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "budget_s": args.budget_s, "environment": environment(),
                       "steps": [json.loads(args.install_json)] if args.install_json else []}
        self.save()

    def left(self):
        return self.args.budget_s - (time.time() - self.start)

    def save(self):
        tmp = os.path.join(self.out, "check.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.report, f, indent=2)
        os.replace(tmp, os.path.join(self.out, "check.json"))

    def record(self, step):
        self.report["steps"].append(step)
        self.save()
        extra = step.get("reason") or {k: v for k, v in step.items()
                                       if k not in ("name", "status", "seconds", "command")}
        print(f"[{step['name']}] {step['status']} in {step.get('seconds', 0):.0f}s: {extra}", flush=True)

    def skip(self, name, reason):
        self.record({"name": name, "status": "skipped", "reason": reason, "seconds": 0})

    def run(self, name, command, limit_s, env=None):
        """Run one command under ``min(limit_s, time left)``; returns (step dict, output text)."""
        limit = min(limit_s, self.left() - 5)
        step = {"name": name, "command": " ".join(command), "limit_s": round(limit)}
        if limit < MIN_STEP_S:
            return dict(step, status="skipped", reason="out of time", seconds=0), ""
        begun = time.time()
        with open(self.log_path, "a") as log:
            log.write(f"\n==> [{time.strftime('%H:%M:%S')}] {name}: {step['command']}\n")
        proc = subprocess.Popen(command, cwd=REPO, env=dict(os.environ, **(env or {})), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=limit)
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: fairseq-train's children too
            output, _ = proc.communicate()
            status = "timeout"
        with open(self.log_path, "a") as log:
            log.write(output)
        step.update(status=status, seconds=round(time.time() - begun, 1), rc=proc.returncode)
        if status == "failed":
            step["reason"] = output.strip().splitlines()[-1][-300:] if output.strip() else "no output"
        return step, output


def environment():
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for package in ("fairseq", "fairscale"):
        try:
            info[package] = __import__(package).__version__
        except Exception as e:  # reported, not fatal: the steps that need it will fail visibly
            info[package] = f"not importable: {e}"
    return info


def cuda_tests(check):
    env = {"FAIRSEQ_THOR_TEST_DEVICE": "cpu"} if check.args.rehearsal else {}
    step, out = check.run("cuda_tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda",
                                         "tests/test_cuda.py", "-p", "no:cacheprovider"], 150, env)
    counts = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", out))
    step.update(counts)
    if step["status"] == "ok" and (counts.get("passed", 0) == 0 or counts.get("skipped", 0)):
        step.update(status="failed", reason=f"expected every cuda test to run: {counts}")
    check.record(step)


def read_training_log(path):
    """The train_inner losses/consistency and the fp16 overflow notes of a fairseq-train log."""
    losses, consistency, updates, overflows = [], [], 0, 0
    for line in open(path, encoding="utf-8", errors="replace"):
        if "train_inner" in line:
            fields = dict(re.findall(r"(\w+)=([-\w.]+)", line))
            losses.append(float(fields.get("loss", "nan")))
            if "consistency" in fields:
                consistency.append(float(fields["consistency"]))
            updates = int(fields.get("num_updates", updates))
        if "gradient overflow detected" in line:
            overflows += 1
    return losses, consistency, updates, overflows


def demo(check, precision):
    name = f"demo_{precision}"
    if check.args.rehearsal and precision == "bf16":
        return check.skip(name, "needs CUDA; the rehearsal runs the fp16 step's script in fp32 on the CPU")
    work = tempfile.mkdtemp(prefix=f"thor-{name}-")
    corpus = os.path.join(check.args.bundle, "demo")
    # the GPU machine has no gettext catalogs: run.sh skips its corpus steps on the bundle's copy. The
    # rehearsal copies it the same way when there is a bundle, else run.sh builds the toy corpus here
    bundled = os.path.isdir(corpus)
    if not check.args.rehearsal or bundled:
        shutil.copytree(corpus, work, dirs_exist_ok=True)
    if check.args.rehearsal:
        env = dict(TOY_DEMO, WORK=work)
    else:
        flag = f"--{precision}"
        env = dict(GPU_DEMO, WORK=work, EXTRA_TRAIN_ARGS=flag, EXTRA_GENERATE_ARGS=flag)
    step, out = check.run(name, ["bash", "examples/demo/run.sh"], 200, env)
    step["corpus"] = f"copied from {corpus}" if bundled else "built by run.sh"
    step["precision"] = "fp32 (rehearsal on the CPU)" if check.args.rehearsal else precision
    train_log = os.path.join(work, "train.log")
    if os.path.exists(train_log):
        shutil.copy(train_log, os.path.join(check.out, f"{name}-train.log"))
        losses, consistency, updates, overflows = read_training_log(train_log)
        step.update(updates=updates, first_loss=losses[0] if losses else None,
                    last_loss=losses[-1] if losses else None,
                    first_consistency=consistency[0] if consistency else None,
                    last_consistency=consistency[-1] if consistency else None, overflows=overflows)
        decoded = re.search(r"decoded (\d+) of (\d+) test sentences", out)
        for metric in ("BLEU", "chrF2"):
            found = re.search(rf"{metric}\s+= ([\d.]+)", out)
            step[metric.lower()] = float(found.group(1)) if found else None
        problems = []
        if not losses or not all(map(math.isfinite, losses + consistency)):
            problems.append("missing or non-finite training loss/consistency")
        elif len(losses) > 1 and not losses[-1] < losses[0]:
            problems.append(f"loss did not fall ({losses[0]} -> {losses[-1]})")
        if overflows > max(3, MAX_OVERFLOW_SHARE * updates):
            problems.append(f"{overflows} overflow skips in {updates} updates: the loss scaler loops")
        if not decoded or decoded.group(1) != decoded.group(2):
            problems.append(f"not every test sentence decoded ({decoded.group(0) if decoded else 'no count'})")
        else:
            step["decoded"] = int(decoded.group(1))
        if problems and step["status"] == "ok":
            step.update(status="failed", reason="; ".join(problems))
    shutil.rmtree(work, ignore_errors=True)
    check.record(step)


def speed(check, experts, decode_experts):
    name = f"speed_e{experts}"
    out_json = os.path.join(check.out, f"{name}.json")
    if check.args.rehearsal:
        size = TOY_SIZE + ["--device", "cpu", "--rounds", "1", "--train-steps", "1", "--decode-repeats", "1",
                           "--decode-length", "4", "--beam", "2"]
    else:
        size = BASE_SIZE + ["--device", "cuda", "--precision", "fp16"]
    step, _ = check.run(name, [sys.executable, "benchmarks/speed.py", *size, "--train-experts", str(experts),
                               "--decode-experts", decode_experts, "--out", out_json], 150)
    if step["status"] == "ok":
        result = json.load(open(out_json))
        step.update(train_ratio=round(result["train_ratio"], 3),
                    train_ratio_fused=result["train_ratio_fused"] and round(result["train_ratio_fused"], 3),
                    decode_ratios={k: round(v, 3) for k, v in result["decode_ratios"].items()},
                    train_words_per_s={k: round(v) for k, v in result["train_words_per_s"].items()})
    check.record(step)


def memory(check):
    out_json = os.path.join(check.out, "memory.json")
    if check.args.rehearsal:
        size = TOY_SIZE + ["--device", "cpu", "--experts", "1,4"]
    else:
        size = BASE_SIZE + ["--device", "cuda", "--experts", "1,4,16,64"]
    step, _ = check.run("memory", [sys.executable, "benchmarks/memory.py", *size, "--out", out_json], 150)
    if step["status"] == "ok":
        step["peak_mib"] = {str(r["experts"]): round(r["peak_bytes"] / 2**20)
                            for r in json.load(open(out_json))["rows"]}
        step["beyond_static_mib"] = {str(r["experts"]): round(r["beyond_static_bytes"] / 2**20)
                                     for r in json.load(open(out_json))["rows"]}
    check.record(step)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for check.json, check.log and the step files")
    p.add_argument("--budget-s", type=float, default=540, help="seconds the steps may take in all")
    p.add_argument("--bundle", default=os.path.join(REPO, "work", "gpu-bundle"))
    p.add_argument("--install-json", default="", help="the install step's result, from check.sh")
    p.add_argument("--rehearsal", action="store_true", help="CPU, toy sizes, CUDA-only steps skipped")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import torch

    if not args.rehearsal and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; on a CPU machine run the rehearsal (check.sh OUT --rehearsal)")
    check = Check(args)
    cuda_tests(check)
    demo(check, "fp16")
    demo(check, "bf16")
    speed(check, 4, "1,4,16")
    speed(check, 16, "16")
    memory(check)
    check.report["seconds"] = round(time.time() - check.start)
    check.save()
    failed = [s["name"] for s in check.report["steps"] if s["status"] in ("failed", "timeout")]
    print(f"check: {len(check.report['steps'])} steps, failed: {', '.join(failed) or 'none'}; "
          f"{os.path.join(args.out, 'check.json')}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
