"""Average the parameters of the last N epoch checkpoints (fairseq's scripts/average_checkpoints.py,
which pip's fairseq does not ship), as Vaswani et al. and Ott et al. do before decoding WMT En-De.

    python average_checkpoints.py --inputs CHECKPOINT_DIR --num-epoch-checkpoints 10 --output avg.pt

Expert banks are ordinary parameters, so each expert is averaged with its own earlier versions.
Integer buffers (version counters) are the newest checkpoint's. The output keeps the newest
checkpoint's config and drops its optimizer state: it is for decoding
(fairseq-generate --path), not for resuming training.
"""
import argparse
import os
import re
import sys
from typing import List

import torch

import fairseq_thor  # noqa: E402,F401  (allow-lists the classes fairseq checkpoints hold for torch's safe loader)

EPOCH_CHECKPOINT = re.compile(r"^checkpoint(\d+)\.pt$")


def last_epoch_checkpoints(directory: str, n: int) -> List[str]:
    """The ``n`` checkpointEPOCH.pt files with the highest epochs (by number: 10 is after 9)."""
    epochs = sorted((int(m.group(1)), name) for name in os.listdir(directory)
                    if (m := EPOCH_CHECKPOINT.match(name)))
    if len(epochs) < n:
        raise ValueError(f"error: {directory} holds {len(epochs)} epoch checkpoints, fewer than {n} "
                         f"(train with --keep-last-epochs {n} or more)")
    return [os.path.join(directory, name) for _, name in epochs[-n:]]


def average(paths: List[str]) -> dict:
    total = None
    for path in paths:  # one checkpoint in memory at a time
        state = torch.load(path, map_location="cpu")
        params = state["model"]
        if total is None:
            total = {k: v.double() if v.is_floating_point() else v.clone() for k, v in params.items()}
        else:
            if params.keys() != total.keys():
                raise ValueError(f"error: {path} has other parameters than {paths[0]}")
            for k, v in params.items():  # float64 sums: no drift over many checkpoints
                total[k] = total[k] + v.double() if v.is_floating_point() else v.clone()
    state["model"] = {k: (v / len(paths)).to(params[k].dtype) if v.is_floating_point() else v
                      for k, v in total.items()}
    state["last_optimizer_state"] = None
    return state


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", required=True, help="the --save-dir of fairseq-train")
    parser.add_argument("--num-epoch-checkpoints", type=int, required=True, help="how many of the last epochs")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    try:
        paths = last_epoch_checkpoints(args.inputs, args.num_epoch_checkpoints)
    except ValueError as e:
        sys.exit(str(e))
    torch.save(average(paths), args.output)
    print(f"averaged {', '.join(os.path.basename(p) for p in paths)} into {args.output}")


if __name__ == "__main__":
    main()
