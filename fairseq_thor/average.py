"""``fairseq-thor-average``: the parameter average of the last N checkpoints, one-process or sharded.

Averaging the last epoch (or update) checkpoints before decoding is how scaling_nmt and the
Transformer papers evaluate WMT; fairseq's ``scripts/average_checkpoints.py`` is not in pip's
fairseq and knows nothing of expert-sharded saves. Here:

    fairseq-thor-average --inputs SAVE_DIR --num-epoch-checkpoints 10 --out avg.pt
    fairseq-thor-average --inputs SAVE_DIR --num-update-checkpoints 5 --out avg.pt
    fairseq-thor-average A.pt B.pt C.pt --out avg.pt

* Expert banks are ordinary parameters: each expert is averaged with its own earlier versions.
* An ``--expert-parallel`` save (``<name>-rank-<R>.pt`` + ``<name>-shared.pt``) is averaged rank by
  rank, each rank's experts in place, and written as a sharded checkpoint ``<out>-rank-<R>.pt`` +
  ``<out>-shared.pt`` (consolidate it to decode on one device); every input must come from the
  same number of ranks.
* Sums run in float64 and are cast back to each tensor's dtype; integer tensors (counters) are the
  newest checkpoint's. The output keeps the newest checkpoint's config and drops the optimizer
  state: it is for decoding, not for resuming. Every input is CRC-checked before use and every
  output file is written atomically.
"""
import argparse
import os
import uuid
from typing import Dict, List, Optional, Tuple

import torch
from fairseq import checkpoint_utils

from . import checkpoint_files, compat
from .distributed import sharded_checkpoint as shards
from .errors import ThorError


def last_checkpoints(directory: str, count: int, by: str) -> List[str]:
    """The ``count`` newest epoch (``by="epoch"``) or update checkpoints in ``directory``, oldest
    first: a one-process save as its file, a sharded one as its prefix (``dir/checkpoint12``)."""
    pattern = checkpoint_files.EPOCH_SAVE if by == "epoch" else checkpoint_files.UPDATE_SAVE
    saves: Dict[int, str] = {}
    for name in os.listdir(directory):
        match = pattern.match(name)
        if match:
            path = os.path.join(directory, name)
            saves[int(match.group(1))] = shards.checkpoint_prefix(path) if match.group(2) else path
    if len(saves) < count:
        flag = "--keep-last-epochs" if by == "epoch" else "--keep-interval-updates"
        raise ThorError(f"{directory} holds {len(saves)} {by} checkpoints, fewer than the {count} asked "
                        f"for (train with {flag} {count} or more, or ask for fewer)")
    return [saves[number] for number in sorted(saves)[-count:]]


def is_sharded(path: str) -> bool:
    return os.path.isfile(shards.rank_path(shards.checkpoint_prefix(path), 0))


def mean_of(tensor_dicts: List[Dict[str, torch.Tensor]], what: str) -> Dict[str, torch.Tensor]:
    """Element-wise mean of float tensors (float64 sums), the last dict's value for the others."""
    names = tensor_dicts[0].keys()
    for i, tensors in enumerate(tensor_dicts[1:], 1):
        if tensors.keys() != names:
            raise ThorError(f"{what}: input {i + 1} has other tensors than input 1 "
                            f"({sorted(set(tensors) ^ set(names))[:4]} ...); average checkpoints of one run")
    out = {}
    for name in names:
        newest = tensor_dicts[-1][name]
        if torch.is_tensor(newest) and newest.is_floating_point():
            total = sum(t[name].double() for t in tensor_dicts)
            out[name] = (total / len(tensor_dicts)).to(newest.dtype)
        else:
            out[name] = newest
    return out


def average_one_process(paths: List[str]) -> dict:
    states = [shards.load(p) for p in paths]
    if any(s.get("expert_parallel") for s in states):
        raise ThorError("a shared file of a sharded save was given as a one-process checkpoint")
    newest = dict(states[-1])
    newest["model"] = mean_of([s["model"] for s in states], "model")
    newest["last_optimizer_state"] = None
    return newest


def average_sharded(paths: List[str]) -> Tuple[dict, List[dict]]:
    """(shared, rank states) of the average of sharded saves of the same world size."""
    saves = [shards.read_shards(p)[1:] for p in paths]  # (shared, ranks) each, CRC-checked
    worlds = {shared["expert_parallel"]["world_size"] for shared, _ in saves}
    if len(worlds) > 1:
        raise ThorError(f"the checkpoints were saved by different numbers of ranks ({sorted(worlds)}); "
                        f"reshard them to one world size first (fairseq-thor-reshard)")
    shared, ranks = saves[-1]
    fingerprint = uuid.uuid4().hex
    meta = {**shared["expert_parallel"], "fingerprint": fingerprint}
    out_shared = {k: v for k, v in shared.items() if k != "last_optimizer_state"}
    out_shared["model"] = mean_of([s["model"] for s, _ in saves], "shared file")
    out_shared["expert_parallel"] = meta
    out_ranks = []
    for r, rank_state in enumerate(ranks):
        averaged = {k: v for k, v in rank_state.items() if k != "optimizer_state"}
        averaged["model"] = mean_of([rs[r]["model"] for _, rs in saves], f"rank {r}")
        averaged["expert_parallel"] = {**rank_state["expert_parallel"], "fingerprint": fingerprint}
        out_ranks.append(averaged)
    return out_shared, out_ranks


def average(paths: List[str], out: str) -> str:
    """Average ``paths`` into ``out``; returns what was written, in words."""
    kinds = {is_sharded(p) for p in paths}
    if len(kinds) > 1:
        raise ThorError("some inputs are sharded (--expert-parallel) and some are not; consolidate "
                        "the sharded ones first (fairseq-thor-consolidate)")
    names = ", ".join(os.path.basename(p) for p in paths)
    if kinds == {False}:
        checkpoint_utils.torch_persistent_save(average_one_process(paths), out)  # atomic
        return f"averaged {names} into {out}"
    prefix = shards.checkpoint_prefix(out)
    shared, ranks = average_sharded(paths)
    shared["expert_parallel"]["shared_file"] = os.path.basename(shards.shared_path(prefix))
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    for r, rank_state in enumerate(ranks):
        rank_state["expert_parallel"]["shared_file"] = shared["expert_parallel"]["shared_file"]
        checkpoint_utils.torch_persistent_save(rank_state, shards.rank_path(prefix, r))
    checkpoint_utils.torch_persistent_save(shared, shards.shared_path(prefix))
    return (f"averaged {names} ({len(ranks)} ranks each) into {shards.shared_path(prefix)} and "
            f"{len(ranks)} rank files")


def main(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(prog="fairseq-thor-average", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", help="checkpoints to average (or use --inputs)")
    parser.add_argument("--inputs", metavar="DIR", help="a --save-dir: average its newest checkpoints")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--num-epoch-checkpoints", type=int, metavar="N", help="the last N epoch checkpoints")
    which.add_argument("--num-update-checkpoints", type=int, metavar="N",
                       help="the last N checkpoint_<epoch>_<update>.pt (--save-interval-updates)")
    parser.add_argument("--out", required=True, help="the checkpoint to write (a prefix for sharded inputs)")
    args = parser.parse_args(argv)
    count = args.num_epoch_checkpoints or args.num_update_checkpoints
    if args.inputs:
        if args.checkpoints or not count:
            parser.error("--inputs DIR takes --num-epoch-checkpoints N or --num-update-checkpoints N "
                         "and no checkpoint paths")
        if count < 1:
            parser.error(f"the number of checkpoints must be >= 1, got {count}")
        paths = last_checkpoints(args.inputs, count, "epoch" if args.num_epoch_checkpoints else "update")
    else:
        if not args.checkpoints or count:
            parser.error("give the checkpoints to average, or --inputs DIR with "
                         "--num-epoch-checkpoints/--num-update-checkpoints N")
        paths = args.checkpoints
    compat.allow_fairseq_checkpoint_globals()
    print(average(paths, args.out))


if __name__ == "__main__":
    main()
