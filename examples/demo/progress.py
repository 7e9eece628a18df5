"""Turn fairseq-train's log into one progress line per report, with an ETA.

    fairseq-train ... --log-format simple 2>&1 | python progress.py --max-update 900 --minutes 26

fairseq prints ``train_inner`` lines (running loss, ``num_updates``, ``wall`` seconds since the
start) and a ``valid on 'valid' subset`` line per validation. The ETA is the remaining updates at
the pace so far (validations included), capped by the time bound if training would hit it first.
Anything that looks like an error is passed through unchanged, so a failure is never hidden.
"""
import argparse
import re
import sys


def fields(line: str) -> dict:
    """``loss=7.1, ...`` (train_inner) or ``| loss 7.1 | ...`` (valid) as a dict of strings."""
    if "train_inner" in line:
        return dict(re.findall(r"(\w+)=([^,\s]+)", line))
    return dict(re.findall(r"\| (\w+) ([-\w.]+)", line))


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def train_line(f: dict, max_update: int, limit_s: float) -> str:
    update, wall = int(f["num_updates"]), float(f["wall"])
    remaining = (max_update - update) * wall / max(update, 1)
    remaining = min(remaining, max(limit_s - wall, 0))
    extra = f"  consistency {f['consistency']}" if "consistency" in f else ""
    return (f"update {update:>5}/{max_update} ({100 * update / max_update:3.0f}%)  "
            f"loss {f['loss']}  ppl {f['ppl']}{extra}  {f.get('wps', '?')} words/s  "
            f"elapsed {clock(wall)}  ETA {clock(remaining)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-update", type=int, required=True)
    p.add_argument("--minutes", type=float, required=True, help="the training time bound")
    args = p.parse_args()
    for line in sys.stdin:
        if "train_inner" in line and "num_updates=" in line:
            print("    " + train_line(fields(line), args.max_update, 60 * args.minutes), flush=True)
        elif "valid on 'valid' subset" in line:
            f = fields(line)
            print(f"    validation after update {f.get('num_updates', '?')}: "
                  f"loss {f.get('loss', '?')}  ppl {f.get('ppl', '?')}", flush=True)
        elif "done training" in line or re.search(r"error|Traceback", line, re.IGNORECASE):
            print("    " + line.split("| INFO | ")[-1].rstrip(), flush=True)


if __name__ == "__main__":
    main()
