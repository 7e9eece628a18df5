"""Offline conversions of expert-sharded checkpoints.

``fairseq-thor-consolidate CKPT --out FILE``: all ranks' experts in one file that
``fairseq-generate --user-dir fairseq_thor`` loads on a single CPU or GPU (and that a one-process
run can resume from: the optimizer state is consolidated too).

``fairseq-thor-reshard CKPT --world-size W --out PREFIX``: the same training state split for W
expert-parallel processes (``PREFIX-rank-R.pt`` for R < min(W, E), and ``PREFIX-shared.pt``); CKPT
may be sharded or a one-process THOR checkpoint (then the optimizer starts afresh: its state is
kept only when the parameter order is known from a sharded checkpoint).

CKPT names any file of a sharded checkpoint (``checkpoint_last-rank-0.pt``, ``-shared.pt``) or its
prefix (``checkpoints/checkpoint_last``).
"""
import argparse
import logging
import os
import uuid
from argparse import Namespace

from fairseq import checkpoint_utils

from .. import compat
from ..errors import ThorError
from . import sharded_checkpoint as shards

logger = logging.getLogger("fairseq_thor.consolidate")


def set_model_option(state: dict, name: str, value):
    """Set a model option in a checkpoint's config (a Namespace for legacy models, else a dict)."""
    for holder in (state.get("args"), (state.get("cfg") or {}).get("model")):
        if isinstance(holder, Namespace):
            setattr(holder, name, value)
        elif isinstance(holder, dict):
            holder[name] = value


def as_dict(section) -> dict:
    """A copy of a checkpoint config section: a Namespace (legacy models and tasks) or a dict."""
    return dict(vars(section)) if isinstance(section, Namespace) else dict(section or {})


def model_option(state: dict, name: str):
    return as_dict((state.get("cfg") or {}).get("model") or state.get("args")).get(name)


def one_process_meta(state: dict) -> dict:
    """Expert tensors of a one-process THOR checkpoint: its (E, out, in) banks and their biases."""
    model = state["model"]
    banks = [k for k, v in model.items()
             if k.endswith((".fc1.weight", ".fc2.weight")) and v.dim() == 3]
    if not banks:
        raise ThorError("the checkpoint has no expert layers (is it a THOR model with --num-experts > 1?)")
    experts = banks + [k[: -len("weight")] + "bias" for k in banks]
    return {"num_experts": model[banks[0]].size(0), "expert_tensors": sorted(experts),
            "param_order": None}


def load_any(path: str):
    """(consolidated one-process state, meta) from a sharded or a one-process checkpoint."""
    prefix = shards.checkpoint_prefix(path)
    if os.path.isfile(shards.rank_path(prefix, 0)):
        _, shared, ranks = shards.read_shards(path)
        return shards.consolidate(shared, ranks), shared["expert_parallel"]
    if not os.path.isfile(path):
        raise ThorError(f"{path}: no such checkpoint (nor {shards.rank_path(prefix, 0)})")
    state = shards.load(path)
    if model_option(state, "expert_parallel"):
        raise ThorError(f"{path} is one rank's file of a sharded checkpoint but its shared file "
                         f"{shards.shared_path(prefix)} is missing")
    return state, one_process_meta(state)


def consolidate_main(argv=None):
    parser = argparse.ArgumentParser(prog="fairseq-thor-consolidate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="any file of the sharded checkpoint, or its prefix")
    parser.add_argument("--out", required=True, help="the one-process checkpoint to write")
    args = parser.parse_args(argv)
    compat.allow_fairseq_checkpoint_globals()
    _, shared, ranks = shards.read_shards(args.checkpoint)
    state = shards.consolidate(shared, ranks)
    set_model_option(state, "expert_parallel", False)
    checkpoint_utils.torch_persistent_save(state, args.out)  # atomic: temporary file, then rename
    world = shared["expert_parallel"]["world_size"]
    print(f"consolidated {world} ranks x {shared['expert_parallel']['num_experts'] // world} experts "
          f"into {args.out}")


def reshard_main(argv=None):
    parser = argparse.ArgumentParser(prog="fairseq-thor-reshard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a sharded checkpoint (any file or prefix) or a one-process one")
    parser.add_argument("--world-size", type=int, required=True,
                        help="number of expert-parallel processes to split for: a divisor or a "
                             "multiple of E (W > E writes E rank files, which every expert group reads)")
    parser.add_argument("--out", required=True,
                        help="prefix of the files to write, e.g. checkpoints4/checkpoint_last")
    args = parser.parse_args(argv)
    compat.allow_fairseq_checkpoint_globals()
    if args.world_size < 1:
        parser.error("--world-size must be >= 1")
    state, meta = load_any(args.checkpoint)
    if meta["param_order"] is None and state.get("last_optimizer_state") is not None:
        logger.warning("a one-process checkpoint does not record its parameter order: the "
                       "optimizer state is dropped (training continues with a fresh optimizer)")
        state = {k: v for k, v in state.items() if k != "last_optimizer_state"}
    set_model_option(state, "expert_parallel", True)
    prefix = shards.checkpoint_prefix(args.out)
    shared, ranks = shards.shard(state, meta, args.world_size, uuid.uuid4().hex,
                                 os.path.basename(shards.shared_path(prefix)))
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    for r, rank_state in enumerate(ranks):
        checkpoint_utils.torch_persistent_save(rank_state, shards.rank_path(prefix, r))
    checkpoint_utils.torch_persistent_save(shared, shards.shared_path(prefix))
    print(f"wrote {shards.shared_path(prefix)} and {len(ranks)} rank files "
          f"({meta['num_experts'] // len(ranks)} experts each) for {args.world_size} processes")
