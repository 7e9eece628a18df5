"""Expert-sharded checkpoints: each rank's experts in their own file, everything else in one.

Naming follows fairseq's MoE branch: ``checkpoint_last-rank-0.pt``, ``checkpoint_last-rank-1.pt``,
... beside ``checkpoint_last-shared.pt``. Inside the files every tensor is named as in a
one-process THOR model ("canonical" names): a rank file holds, for each expert bank
(``<layer>.fc1.weight``, E x F x C in one process), the E/S experts of that shard (S = min(W, E)
files, written by the first expert group: ``modules/expert_groups.py``), stacked in expert order.
Optimizer state is split the same way and keyed by parameter name rather than by position,
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
from ..errors import ThorError
from ..modules import expert_groups

ExpertNames = Sequence[Tuple[str, List[str]]]  # (canonical name, its per-expert names here)

_SHARD_FILE = re.compile(r"^(?P<prefix>.*?)(-rank-(?P<rank>\d+)|-shared)\.pt$")


def checkpoint_prefix(path: str) -> str:
    """``dir/checkpoint_last-rank-1.pt``, ``-shared.pt`` or ``.pt`` -> ``dir/checkpoint_last``."""
    match = _SHARD_FILE.match(path)
    if match:
        return match.group("prefix")
    return path[: -len(".pt")] if path.endswith(".pt") else path


def is_shard_file(path: str) -> bool:
    """Whether ``path`` is named as one file of a sharded save (``-rank-R.pt``, ``-shared.pt``)."""
    return bool(_SHARD_FILE.match(path))


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
        raise ThorError(f"optimizer state names parameters this model does not have: {missing[:3]}")
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
            raise ThorError(f"cannot divide a tensor of {value.size(0)} experts into {parts} parts")
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
        raise ThorError(f"{shared_path(prefix)} is not the shared file of an expert-sharded checkpoint")
    theirs = rank_state.get("expert_parallel", {})
    if theirs.get("rank") != rank or theirs.get("world_size") != meta["world_size"]:
        raise ThorError(f"{rank_path(prefix, rank)} was saved as rank {theirs.get('rank')} of "
                         f"{theirs.get('world_size')}, expected rank {rank} of {meta['world_size']}")
    if theirs.get("fingerprint") != meta["fingerprint"]:
        raise ThorError(
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
    """Split a consolidated checkpoint for ``world_size`` processes (files as training saves them:
    min(world_size, E) rank files, see ``modules/expert_groups.py``).

    ``meta`` is the ``expert_parallel`` entry of a shared file (tensor names, parameter order).
    """
    num_experts = meta["num_experts"]
    if not expert_groups.compatible(num_experts, world_size):
        valid = [w for w in range(1, num_experts + 1) if num_experts % w == 0] + [2 * num_experts]
        raise ThorError(f"--world-size {world_size} must be a divisor or a multiple of the "
                        f"checkpoint's {num_experts} experts: {', '.join(map(str, valid))}, ...")
    files = expert_groups.num_shards(num_experts, world_size)
    experts = meta["expert_tensors"]
    new_meta = {**meta, "world_size": files, "fingerprint": fingerprint, "shared_file": shared_file}
    shared = {k: v for k, v in full.items() if k not in ("model", "last_optimizer_state")}
    shared["model"] = {k: v for k, v in full["model"].items() if k not in experts}
    shared["expert_parallel"] = new_meta
    ranks = [{"expert_parallel": {**{k: new_meta[k] for k in ("world_size", "num_experts",
                                                                "fingerprint", "shared_file")},
                                  "rank": r},
              "model": {}} for r in range(files)]
    for k in experts:
        for r, piece in enumerate(_split(full["model"][k], files)):
            ranks[r]["model"][k] = piece
    optimizer = full.get("last_optimizer_state")
    if optimizer is not None:
        named = optimizer_state_by_name(optimizer, meta["param_order"])
        for r in ranks:
            r["optimizer_state"] = {}
        for k in experts:
            if k in named["state"]:
                for r, piece in enumerate(_split(named["state"].pop(k), files)):
                    ranks[r]["optimizer_state"][k] = piece
        shared["last_optimizer_state"] = named
    return shared, ranks


# ---- keeping shared files in step with fairseq's deletion of old rank files -------------------



def _numbered_shared(directory: str, pattern) -> List[Tuple[int, str]]:
    """(number, path) of the shared files matching ``pattern``, highest number first."""
    found = []
    for name in os.listdir(directory):
        match = pattern.match(name)
        if match and name.endswith("-shared.pt"):
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found, reverse=True)


def referenced_shared_files(directory: str) -> set:
    """Shared files that a copied rank file (checkpoint_best, checkpoint.best_*) depends on: rank-0
    files without a shared file of their own record the one they were saved with."""
    referenced = set()
    for name in os.listdir(directory):
        if name.endswith("-rank-0.pt") and not os.path.isfile(shared_path(os.path.join(directory, name[: -len("-rank-0.pt")]))):
            try:  # mmap: only the small pickled part is read
                meta = torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True,
                                  mmap=True).get("expert_parallel", {})
            except Exception:  # an unreadable copy protects nothing; loading it reports it
                continue
            if meta.get("shared_file"):
                referenced.add(os.path.join(directory, meta["shared_file"]))
    return referenced


def shared_files_to_remove(directory: str, saving: str, keep_interval_updates: int,
                           keep_interval_updates_pattern: int, keep_last_epochs: int) -> List[str]:
    """The shared files to delete when rank 0 saves ``saving``, so they follow fairseq's
    ``--keep-interval-updates``/``--keep-last-epochs``, which delete only the rank files.

    fairseq removes old rank files right after the save, by the same rules applied here to the
    shared files; a numbered shared file whose rank-0 file is already gone goes too. A shared file
    that a copied rank file (checkpoint_best, ...) still needs is kept."""
    remove = set()
    for pattern in (checkpoint_files.UPDATE_SAVE, checkpoint_files.EPOCH_SAVE):
        for _, path in _numbered_shared(directory, pattern):
            if not os.path.isfile(rank_path(path[: -len("-shared.pt")], 0)):
                remove.add(path)
    name = os.path.basename(saving)
    # fairseq's mid-epoch rule
    if keep_interval_updates > 0 and checkpoint_files.UPDATE_SAVE.match(name):
        saves = [(n, p) for n, p in _numbered_shared(directory, checkpoint_files.UPDATE_SAVE)
                 if keep_interval_updates_pattern <= 0 or n % keep_interval_updates_pattern != 0]
        remove.update(p for _, p in saves[keep_interval_updates:])
    if keep_last_epochs > 0 and checkpoint_files.EPOCH_SAVE.match(name):
        epochs = _numbered_shared(directory, checkpoint_files.EPOCH_SAVE)
        remove.update(p for _, p in epochs[keep_last_epochs:])
    return sorted(remove - referenced_shared_files(directory))


# ---- resuming on W ranks: do all ranks hold the same save? -------------------------------------

def save_summary(path: str, rank_state: Optional[dict], problem: Optional[str]) -> Optional[dict]:
    """What one rank tells the others about the file it read (None: it has no file)."""
    if rank_state is None and problem is None:
        return None
    meta = (rank_state or {}).get("expert_parallel", {})
    history = (rank_state or {}).get("optimizer_history") or [{}]
    return {"file": path, "world_size": meta.get("world_size", -1), "fingerprint": meta.get("fingerprint"),
            "updates": history[-1].get("num_updates"), "problem": problem}


def newest_complete_save(directory: str, num_shards: int) -> Optional[str]:
    """The newest numbered save in ``directory`` with a shared file and all ``num_shards`` rank
    files (by name: the files are not read), as the path to give ``--restore-file``."""
    complete = []
    for name in os.listdir(directory):
        if not (name.endswith("-rank-0.pt") and checkpoint_files.is_numbered(name)):
            continue
        prefix = os.path.join(directory, name[: -len("-rank-0.pt")])
        if all(os.path.isfile(p) for p in [shared_path(prefix)] +
               [rank_path(prefix, r) for r in range(num_shards)]):
            complete.append((os.path.getmtime(rank_path(prefix, 0)), prefix + ".pt"))
    return max(complete)[1] if complete else None


def check_ranks_agree(prefix: str, saved: List[Optional[dict]], num_shards: int):
    """Refuse, identically on every rank, to resume from files that are not one save for this
    run; ``saved`` holds every rank's :func:`save_summary` (rank r read shard r mod
    ``num_shards``: ranks past the first expert group read the same files as their replicas)."""
    problems = [f"rank {r}: {s['problem']}" for r, s in enumerate(saved) if s and s["problem"]]
    if problems:
        raise ThorError(f"cannot resume from {prefix}: {'; '.join(problems)}")
    missing = sorted({rank_path(prefix, r % num_shards) for r, s in enumerate(saved) if s is None})
    if missing:
        raise ThorError(f"cannot resume from {prefix}: {', '.join(missing)} missing; every rank "
                        f"needs its file ({_resume_hint(prefix, num_shards)})")
    saved_shards = saved[0]["world_size"]
    if any(s["world_size"] != num_shards for s in saved):
        raise ThorError(
            f"{prefix} was saved by {saved_shards} expert-parallel ranks, this run has "
            f"{num_shards} (min of world size and --num-experts); reshard it first: "
            f"fairseq-thor-reshard {rank_path(prefix, 0)} --world-size {num_shards} "
            f"--out <new prefix>"
        )
    if len({s["fingerprint"] for s in saved}) > 1:
        listing = ", ".join(sorted({f"{s['file']} (update {s['updates']})" for s in saved}))
        raise ThorError(
            f"the ranks' files come from different saves: {listing}; an interrupted save leaves "
            f"this, and training on would mix two models ({_resume_hint(prefix, num_shards)})"
        )


def _resume_hint(prefix: str, num_shards: int) -> str:
    complete = newest_complete_save(os.path.dirname(os.path.abspath(prefix)), num_shards)
    if complete is None:
        return "no complete numbered save is beside it: restore the missing files or train afresh"
    return f"resume every rank from one save, e.g. with --restore-file {complete}"


def shared_for(prefix: str, rank_state: dict) -> dict:
    """The shared file saved together with ``rank_state``: ``<prefix>-shared.pt`` or, for a copy
    fairseq made of a rank file, the shared file recorded in it."""
    meta = rank_state.get("expert_parallel")
    if meta is None:
        raise ThorError(f"{rank_path(prefix, 0)} is not a rank file of an expert-sharded checkpoint")
    candidates = [shared_path(prefix),
                  os.path.join(os.path.dirname(prefix), meta.get("shared_file", ""))]
    for path in candidates:
        if os.path.isfile(path):
            shared = load(path)
            if shared.get("expert_parallel", {}).get("fingerprint") == meta["fingerprint"]:
                return shared
    raise ThorError(
        f"no shared file from the same save as {rank_path(prefix, meta.get('rank', 0))} "
        f"(looked for {' and '.join(sorted(set(candidates)))}): the checkpoint is incomplete"
    )


def read_shards(path: str) -> Tuple[str, dict, List[dict]]:
    """All files of the sharded checkpoint ``path`` names (any of its files, or its prefix)."""
    prefix = checkpoint_prefix(path)
    if not os.path.isfile(rank_path(prefix, 0)):
        if os.path.isfile(path) and not is_shard_file(path):
            checkpoint_files.verify(path)  # a damaged file is refused as such, like every input
            raise ThorError(f"{path} is a one-process checkpoint, not an expert-sharded one (no "
                            f"{os.path.basename(rank_path(prefix, 0))} beside it): it needs no "
                            f"consolidation; decode it with --path {path} or resume it with --restore-file")
        raise ThorError(
            f"{rank_path(prefix, 0)} not found: expected an expert-sharded checkpoint "
            f"(<name>-rank-<R>.pt for every rank, and <name>-shared.pt)"
        )
    first = load(rank_path(prefix, 0))
    shared = shared_for(prefix, first)
    world_size = shared["expert_parallel"]["world_size"]
    missing = [rank_path(prefix, r) for r in range(world_size) if not os.path.isfile(rank_path(prefix, r))]
    if missing:
        raise ThorError(f"the checkpoint was saved by {world_size} ranks but these files are "
                                f"missing: {', '.join(missing)}")
    ranks = [first] + [load(rank_path(prefix, r)) for r in range(1, world_size)]
    for r, rank_state in enumerate(ranks):
        check_shard(shared, rank_state, r, prefix)
    return prefix, shared, ranks
