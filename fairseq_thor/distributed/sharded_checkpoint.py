"""Expert-sharded checkpoints: each rank's experts in their own file, everything else in one.

Naming follows fairseq's MoE branch: ``checkpoint_last-rank-0.pt``, ``checkpoint_last-rank-1.pt``,
... beside ``checkpoint_last-shared.pt``. Inside the files every tensor is named as in a
one-process THOR model ("canonical" names): a rank file holds, for each expert bank
(``<layer>.fc1.weight``, E x F x C in one process), the E/W experts of that rank, stacked in expert
order. Optimizer state is split the same way and keyed by parameter name rather than by position,
because the position of a parameter depends on how many experts each process holds. So any
world size can read what any other wrote: consolidating is concatenation, resharding is splitting.

The pure dictionary work lives here; ``trainer.py`` saves and loads these files during training,
``consolidate.py`` converts them offline.
"""
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import checkpoint_files

ExpertNames = Sequence[Tuple[str, List[str]]]  # (canonical name, its per-expert names here)

_SHARD_FILE = re.compile(r"^(?P<prefix>.*?)(-rank-(?P<rank>\d+)|-shared)\.pt$")


def checkpoint_prefix(path: str) -> str:
    """``dir/checkpoint_last-rank-1.pt``, ``-shared.pt`` or ``.pt`` -> ``dir/checkpoint_last``."""
    match = _SHARD_FILE.match(path)
    if match:
        return match.group("prefix")
    return path[: -len(".pt")] if path.endswith(".pt") else path


def rank_path(prefix: str, rank: int) -> str:
    return f"{prefix}-rank-{rank}.pt"


def shared_path(prefix: str) -> str:
    return f"{prefix}-shared.pt"


def load(path: str) -> dict:
    """Read one file with torch's safe loader (fairseq_thor allow-lists what checkpoints hold),
    after checking its CRCs: a damaged file is refused with its name."""
    return checkpoint_files.load(path)


# ---- optimizer state: by position <-> by name --------------------------------------------------

def optimizer_state_by_name(state: dict, param_names: List[str]) -> dict:
    """Key a torch/fairseq optimizer ``state_dict`` by parameter name instead of position."""
    named = {k: v for k, v in state.items() if k not in ("state", "param_groups")}
    named["state"] = {param_names[i]: s for i, s in state["state"].items()}
    named["param_groups"] = [
        {**group, "params": [param_names[i] for i in group["params"]]}
        for group in state["param_groups"]
    ]
    return named


def optimizer_state_by_position(named: dict, param_names: List[str]) -> dict:
    position = {name: i for i, name in enumerate(param_names)}
    missing = [n for g in named["param_groups"] for n in g["params"] if n not in position]
    if missing:
        raise ValueError(f"optimizer state names parameters this model does not have: {missing[:3]}")
    state = {k: v for k, v in named.items() if k not in ("state", "param_groups")}
    state["state"] = {position[n]: s for n, s in named["state"].items()}
    # torch matches saved to live parameters by their order within a group: keep the live order
    state["param_groups"] = [
        {**group, "params": sorted(position[n] for n in group["params"])}
        for group in named["param_groups"]
    ]
    return state


# ---- experts: per-process names <-> canonical stacked banks -------------------------------------

def _join(values: List, join):
    """Join per-expert (or per-rank) values with ``join`` (torch.stack / torch.cat), leaf by leaf;
    per-parameter scalars such as Adam's ``step`` are shared by all and kept once."""
    first = values[0]
    if isinstance(first, dict):
        return {k: _join([v[k] for v in values], join) for k in first}
    if isinstance(first, Tensor) and first.dim() > 0:
        return join(values)
    return first


def _divide(value, parts: int, divide) -> List:
    """The inverse of ``_join``: ``divide(tensor, parts)`` is unbind or chunk."""
    if isinstance(value, dict):
        pieces = {k: _divide(v, parts, divide) for k, v in value.items()}
        return [{k: pieces[k][i] for k in value} for i in range(parts)]
    if isinstance(value, Tensor) and value.dim() > 0:
        pieces = divide(value, parts)
        if len(pieces) != parts:
            raise ValueError(f"cannot divide a tensor of {value.size(0)} experts into {parts} parts")
        return [p.clone() for p in pieces]
    return [value] * parts


def _stack(values: List):
    return _join(values, torch.stack)


def _unstack(value, count: int) -> List:
    return _divide(value, count, lambda t, n: t.unbind(0))


def _cat(values: List):
    return _join(values, torch.cat)


def _split(value, parts: int) -> List:
    return _divide(value, parts, lambda t, n: t.chunk(n))


def to_canonical(tensors: Dict[str, object], expert_names: ExpertNames) -> Dict[str, object]:
    """Replace the per-expert entries of ``tensors`` by one stacked entry per canonical name."""
    out = dict(tensors)
    for canonical, local in expert_names:
        if local[0] in out:
            out[canonical] = _stack([out.pop(name) for name in local])
    return out


def from_canonical(tensors: Dict[str, object], expert_names: ExpertNames) -> Dict[str, object]:
    out = dict(tensors)
    for canonical, local in expert_names:
        if canonical in out:
            out.update(zip(local, _unstack(out.pop(canonical), len(local))))
    return out


def canonical_param_names(param_names: List[str], expert_names: ExpertNames) -> List[str]:
    """Optimizer order as a one-process model has it: each expert bank where its first expert is."""
    rename = {name: canonical for canonical, local in expert_names for name in local}
    seen, order = set(), []
    for name in param_names:
        name = rename.get(name, name)
        if name not in seen:
            seen.add(name)
            order.append(name)
    return order


# ---- one rank's training state <-> (rank file, shared file) -------------------------------------

def split_for_rank(state: dict, param_names: List[str], expert_names: ExpertNames, rank: int,
                   world_size: int, num_experts: int, fingerprint: str,
                   shared_file: str) -> Tuple[dict, Optional[dict]]:
    """Split one rank's fairseq training state into its rank file and (rank 0) the shared file.

    ``shared_file`` (a base name) is recorded in the rank file: fairseq copies a saved rank file
    to its other names (``checkpoint_best``, ``checkpoint.best_*``) without its shared file, and
    the copy finds its shared file through this record.
    """
    experts = {canonical for canonical, _ in expert_names}
    model = to_canonical(state["model"], expert_names)
    meta = {"world_size": world_size, "num_experts": num_experts, "fingerprint": fingerprint,
            "shared_file": shared_file}
    rank_state = {
        "expert_parallel": {**meta, "rank": rank},
        "model": {k: v for k, v in model.items() if k in experts},
        # the small descriptive parts, so fairseq's loaders read a rank file far enough to
        # build the model and explain that it needs consolidating
        **{k: state[k] for k in ("args", "cfg", "optimizer_history", "extra_state") if k in state},
    }
    optimizer = state.get("last_optimizer_state")
    if optimizer is not None:
        named = optimizer_state_by_name(optimizer, param_names)
        named["state"] = to_canonical(named["state"], expert_names)
        named["param_groups"] = [
            {**g, "params": canonical_param_names(g["params"], expert_names)}
            for g in named["param_groups"]
        ]
        rank_state["optimizer_state"] = {k: v for k, v in named["state"].items() if k in experts}
        named["state"] = {k: v for k, v in named["state"].items() if k not in experts}
    if rank != 0:
        return rank_state, None
    shared = {k: v for k, v in state.items() if k not in ("model", "last_optimizer_state")}
    shared["model"] = {k: v for k, v in model.items() if k not in experts}
    if optimizer is not None:
        shared["last_optimizer_state"] = named
    shared["expert_parallel"] = {
        **meta,
        "expert_tensors": sorted(experts),
        "param_order": canonical_param_names(param_names, expert_names),
    }
    return rank_state, shared


def check_shard(shared: dict, rank_state: dict, rank: int, prefix: str):
    """Clear errors for a rank file that does not belong with ``shared``."""
    meta = shared.get("expert_parallel")
    if meta is None:
        raise ValueError(f"{shared_path(prefix)} is not the shared file of an expert-sharded checkpoint")
    theirs = rank_state.get("expert_parallel", {})
    if theirs.get("rank") != rank or theirs.get("world_size") != meta["world_size"]:
        raise ValueError(f"{rank_path(prefix, rank)} was saved as rank {theirs.get('rank')} of "
                         f"{theirs.get('world_size')}, expected rank {rank} of {meta['world_size']}")
    if theirs.get("fingerprint") != meta["fingerprint"]:
        raise ValueError(
            f"{rank_path(prefix, rank)} and {shared_path(prefix)} come from different saves "
            f"(an interrupted save, or files copied over each other); use another checkpoint"
        )


def merge_for_rank(shared: dict, rank_state: dict, param_names: List[str],
                   expert_names: ExpertNames) -> dict:
    """The fairseq training state of one expert-parallel process, from its rank file + shared."""
    state = {k: v for k, v in shared.items() if k != "expert_parallel"}
    model = {**shared["model"], **rank_state["model"]}
    state["model"] = from_canonical(model, expert_names)
    named = shared.get("last_optimizer_state")
    if named is not None and "optimizer_state" in rank_state:
        rename = {canonical: local for canonical, local in expert_names}
        named = {**named, "state": from_canonical({**named["state"], **rank_state["optimizer_state"]},
                                                 expert_names)}
        named["param_groups"] = [
            {**g, "params": [n for c in g["params"] for n in rename.get(c, [c])]}
            for g in named["param_groups"]
        ]
        state["last_optimizer_state"] = optimizer_state_by_position(named, param_names)
    return state


# ---- whole checkpoints: consolidate and reshard --------------------------------------------------

def consolidate(shared: dict, ranks: Sequence[dict]) -> dict:
    """One one-process THOR checkpoint (experts concatenated in rank order) from all shards."""
    meta = shared["expert_parallel"]
    experts = meta["expert_tensors"]
    state = {k: v for k, v in shared.items() if k != "expert_parallel"}
    state["model"] = {**shared["model"], **{k: _cat([r["model"][k] for r in ranks]) for k in experts}}
    named = shared.get("last_optimizer_state")
    if named is not None and all("optimizer_state" in r for r in ranks):
        full = {**named["state"]}
        for k in experts:
            if k in ranks[0]["optimizer_state"]:
                full[k] = _cat([r["optimizer_state"][k] for r in ranks])
        state["last_optimizer_state"] = optimizer_state_by_position({**named, "state": full},
                                                                    meta["param_order"])
    else:
        state.pop("last_optimizer_state", None)
    return state


def shard(full: dict, meta: dict, world_size: int, fingerprint: str,
          shared_file: str) -> Tuple[dict, List[dict]]:
    """Split a consolidated checkpoint for ``world_size`` processes (files as training saves them).

    ``meta`` is the ``expert_parallel`` entry of a shared file (tensor names, parameter order).
    """
    num_experts = meta["num_experts"]
    if num_experts % world_size != 0:
        raise ValueError(f"--world-size {world_size} must divide the number of experts ({num_experts})")
    experts = meta["expert_tensors"]
    new_meta = {**meta, "world_size": world_size, "fingerprint": fingerprint, "shared_file": shared_file}
    shared = {k: v for k, v in full.items() if k not in ("model", "last_optimizer_state")}
    shared["model"] = {k: v for k, v in full["model"].items() if k not in experts}
    shared["expert_parallel"] = new_meta
    ranks = [{"expert_parallel": {**{k: new_meta[k] for k in ("world_size", "num_experts",
                                                                "fingerprint", "shared_file")},
                                  "rank": r},
              "model": {}} for r in range(world_size)]
    for k in experts:
        for r, piece in enumerate(_split(full["model"][k], world_size)):
            ranks[r]["model"][k] = piece
    optimizer = full.get("last_optimizer_state")
    if optimizer is not None:
        named = optimizer_state_by_name(optimizer, meta["param_order"])
        for r in ranks:
            r["optimizer_state"] = {}
        for k in experts:
            if k in named["state"]:
                for r, piece in enumerate(_split(named["state"].pop(k), world_size)):
                    ranks[r]["optimizer_state"][k] = piece
        shared["last_optimizer_state"] = named
    return shared, ranks


def shared_for(prefix: str, rank_state: dict) -> dict:
    """The shared file saved together with ``rank_state``: ``<prefix>-shared.pt`` or, for a copy
    fairseq made of a rank file, the shared file recorded in it."""
    meta = rank_state.get("expert_parallel")
    if meta is None:
        raise ValueError(f"{rank_path(prefix, 0)} is not a rank file of an expert-sharded checkpoint")
    candidates = [shared_path(prefix),
                  os.path.join(os.path.dirname(prefix), meta.get("shared_file", ""))]
    for path in candidates:
        if os.path.isfile(path):
            shared = load(path)
            if shared.get("expert_parallel", {}).get("fingerprint") == meta["fingerprint"]:
                return shared
    raise FileNotFoundError(
        f"no shared file from the same save as {rank_path(prefix, meta.get('rank', 0))} "
        f"(looked for {' and '.join(sorted(set(candidates)))}): the checkpoint is incomplete"
    )


def read_shards(path: str) -> Tuple[str, dict, List[dict]]:
    """All files of the sharded checkpoint ``path`` names (any of its files, or its prefix)."""
    prefix = checkpoint_prefix(path)
    if not os.path.isfile(rank_path(prefix, 0)):
        raise FileNotFoundError(
            f"{rank_path(prefix, 0)} not found: expected an expert-sharded checkpoint "
            f"(<name>-rank-<R>.pt for every rank, and <name>-shared.pt)"
        )
    first = load(rank_path(prefix, 0))
    shared = shared_for(prefix, first)
    world_size = shared["expert_parallel"]["world_size"]
    missing = [rank_path(prefix, r) for r in range(world_size) if not os.path.isfile(rank_path(prefix, r))]
    if missing:
        raise FileNotFoundError(f"the checkpoint was saved by {world_size} ranks but these files are "
                                f"missing: {', '.join(missing)}")
    ranks = [first] + [load(rank_path(prefix, r)) for r in range(1, world_size)]
    for r, rank_state in enumerate(ranks):
        check_shard(shared, rank_state, r, prefix)
    return prefix, shared, ranks
