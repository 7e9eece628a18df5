"""Carry an unfinished convergence cell from one session to the next, through the repository.

A session keeps only what is committed: the next session lays the work tree anew, so a cell's work
folder (WORK/cells/<model>-seed<S>/: the checkpoints and logs it resumes from) is gone, and a cell
longer than a session -- a THOR cell trains ~4 hours on 2 idle cores -- would start over every
session and never finish. (Seen on 2026-12-07: THOR E=2 at 14,500 updates and dense seed 2 at
16,000 were lost that way.)

:func:`pack` writes what the cell needs to go on into OUT/carry/<model>-seed<S>/, to be committed:

* ``checkpoint_last.pt`` whole -- weights, the optimizer's moments, the learning-rate schedule, the
  position in the data and the ``--patience`` counter -- so that the training goes on exactly as an
  uninterrupted run does, update for update;
* the update checkpoints that scoring may still decode, weights only
  (``convergence_cells.checkpoints_scoring_may_need``: the best so far, the best within the
  equal-time budget, those that may still be among the last ``--average`` averaged); every other
  checkpoint scoring needs is written after the resume;
* the attempts' logs, ``attempts.json``, ``recipe.json`` and the carries before this one: the curve
  and the training time so far.

Tensors are written into shard files of at most :data:`SHARD_BYTES` (45 MiB), below the 50 MiB at
which Git hosts start to warn; the rest of each checkpoint is a small skeleton. :func:`restore` rebuilds the
work folder from a carry when the folder has no ``checkpoint_last.pt``, after checking that the
carry was packed for the same recipe and the same dictionary. A carried cell records each carry
(``carried``: the update it went on from, when it was packed and restored).

A carry costs the repository ~12 bytes per parameter for the last checkpoint and 4 per carried
update checkpoint: ~90-150 MB for THOR E=2 (7.6M parameters), once per session a cell spans; a
scored cell's carry is deleted from the tree (not from the history).
"""
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from atomic_files import write_json

CARRY = "carry"
SHARD_BYTES = 45 * 2**20
TENSOR = "carried tensor "  # a skeleton's placeholder for a tensor in a shard: TENSOR + its key
WORK_FILES = ("recipe.json", "attempts.json", "carried.json", "trained.json")


def carry_folder(out: str, label: str) -> str:
    return os.path.join(out, CARRY, label)


def dictionary_sha1(data: str) -> str:
    """One SHA-1 over the data folder's dictionaries: a carried model's embeddings index them."""
    digest = hashlib.sha1()
    for name in sorted(n for n in os.listdir(data) if n.startswith("dict.") and n.endswith(".txt")):
        with open(os.path.join(data, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()


# ---- tensors in shards, the rest in skeletons --------------------------------------------------

def _split(obj, key: str, tensors: Dict[str, torch.Tensor]):
    """``obj`` with every tensor replaced by a placeholder naming its key in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj
        return TENSOR + key
    if isinstance(obj, dict):
        return type(obj)((k, _split(v, f"{key}/{k}", tensors)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(v, f"{key}/{i}", tensors) for i, v in enumerate(obj))
    return obj


def _join(obj, tensors: Dict[str, torch.Tensor]):
    if isinstance(obj, str) and obj.startswith(TENSOR):
        return tensors[obj[len(TENSOR):]]
    if isinstance(obj, dict):
        return type(obj)((k, _join(v, tensors)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_join(v, tensors) for v in obj)
    return obj


def _shards(tensors: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
    """Tensors in file-sized groups, in order (one tensor larger than a shard gets its own).

    torch.save writes a tensor's whole storage, once per file: tensors that share one (fairseq's
    shared embeddings and output projection) go into the same shard and count once, and a view
    of a larger storage is copied out so that the rest of that storage is not written."""
    groups, size, shard_of = [{}], 0, {}
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.untyped_storage().nbytes() != nbytes:
            tensor = tensor.contiguous().clone()
        storage = tensor.untyped_storage().data_ptr()
        if storage in shard_of:
            groups[shard_of[storage]][key] = tensor
            continue
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append({})
            size = 0
        groups[-1][key] = tensor
        shard_of[storage] = len(groups) - 1
        size += nbytes
    return groups


def _load(path: str):
    from fairseq_thor import checkpoint_files  # here: the report-only paths need no fairseq

    return checkpoint_files.load(path)  # CRC-checked, torch's safe loader with fairseq's classes allowed


# ---- pack --------------------------------------------------------------------------------------

def pack(work: str, folder: str, recipe: dict, data: str,
         choose: Callable[[int], Tuple[Dict[int, str], Dict[int, str]]]) -> dict:
    """Write ``work``'s resumable state into ``folder`` (replacing an older carry only once the new
    one is whole); return its carry.json. ``choose(last_update)`` gives the update checkpoints saved
    up to ``checkpoint_last.pt``'s update (update -> path) and those to carry (update -> why).

    Safe while the cell trains: ``checkpoint_last.pt`` is read first (fairseq replaces it by a
    rename, so the read is whole), and only what it had seen is chosen from; the logs copied after
    it may run further, and the resumed run redoes those updates."""
    save_dir = os.path.join(work, "checkpoints")
    last = _load(os.path.join(save_dir, "checkpoint_last.pt"))
    last_update = last["optimizer_history"][-1]["num_updates"]
    saved, needed = choose(last_update)
    names = {u: os.path.basename(path) for u, path in saved.items()}
    tensors, skeletons, checkpoints = {}, {}, {}
    skeletons["checkpoint_last.pt"] = _split(last, "checkpoint_last.pt", tensors)
    checkpoints["checkpoint_last.pt"] = {"update": last_update, "why": "resumes the training", "optimizer": True}
    for update, why in needed.items():
        name = names[update]
        if update == last_update:  # fairseq wrote the same bytes to both: restored as a copy
            checkpoints[name] = {"update": update, "why": why, "copy_of": "checkpoint_last.pt"}
            continue
        state = _load(os.path.join(save_dir, name))
        state.pop("last_optimizer_state", None)  # decoded or averaged, never resumed from
        skeletons[name] = _split(state, name, tensors)
        checkpoints[name] = {"update": update, "why": why, "optimizer": False}
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".packing-", dir=parent)
    try:
        shard_names = []
        for i, group in enumerate(_shards(tensors)):
            shard_names.append(f"tensors-{i:03d}.pt")
            torch.save(group, os.path.join(staging, shard_names[-1]))
        torch.save(skeletons, os.path.join(staging, "skeletons.pt"))
        os.makedirs(os.path.join(staging, "work"))
        for name in sorted(os.listdir(work)):
            if name in WORK_FILES or (name.startswith("train-") and name.endswith(".log")):
                shutil.copyfile(os.path.join(work, name), os.path.join(staging, "work", name))
        meta = {"cell": os.path.basename(folder), "update": last_update, "packed_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                "recipe": recipe, "dictionary_sha1": dictionary_sha1(data), "checkpoints": checkpoints,
                "shards": shard_names, "bytes": sum(os.path.getsize(os.path.join(staging, n))
                                                    for n in shard_names + ["skeletons.pt"])}
        write_json(os.path.join(staging, "carry.json"), meta)
        _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta


def _swap_in(staging: str, folder: str):
    """``staging`` becomes ``folder``; an older carry there goes only after the rename."""
    old = None
    if os.path.exists(folder):
        old = folder + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(staging, folder)
    if old:
        shutil.rmtree(old)


# ---- restore -----------------------------------------------------------------------------------

def read(folder: str) -> Optional[dict]:
    path = os.path.join(folder, "carry.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def restore(folder: str, work: str, data: str) -> dict:
    """Rebuild ``work`` (which must not hold a checkpoint_last.pt) from the carry in ``folder``;
    return its carry.json. The caller has compared the recipes."""
    meta = read(folder)
    have = dictionary_sha1(data)
    if meta["dictionary_sha1"] != have:
        raise RuntimeError(f"{folder} was packed for another dictionary (SHA-1 {meta['dictionary_sha1'][:12]}, "
                           f"{data} has {have[:12]}): its checkpoints index other tokens; delete the folder to "
                           "train the cell afresh, or build the corpus the carry was trained on")
    tensors = {}
    for shard in meta["shards"]:
        tensors.update(_load(os.path.join(folder, shard)))
    skeletons = _load(os.path.join(folder, "skeletons.pt"))
    # built beside the work folder and renamed into place: a kill halfway leaves no folder that
    # looks resumable but lacks the checkpoints scoring needs
    staging = work + ".restoring"
    shutil.rmtree(staging, ignore_errors=True)
    save_dir = os.path.join(staging, "checkpoints")
    os.makedirs(save_dir)
    for name in sorted(os.listdir(os.path.join(folder, "work"))):
        shutil.copyfile(os.path.join(folder, "work", name), os.path.join(staging, name))
    for name, skeleton in skeletons.items():
        torch.save(_join(skeleton, tensors), os.path.join(save_dir, name))
    for name, entry in meta["checkpoints"].items():
        if "copy_of" in entry:
            shutil.copyfile(os.path.join(save_dir, entry["copy_of"]), os.path.join(save_dir, name))
    carried = os.path.join(staging, "carried.json")
    history = []
    if os.path.exists(carried):
        with open(carried) as f:
            history = json.load(f)
    write_json(carried, history + [{"update": meta["update"], "packed_at": meta["packed_at"],
                                    "restored_at": time.strftime("%Y-%m-%d %H:%M:%S")}])
    shutil.rmtree(work, ignore_errors=True)
    os.replace(staging, work)
    return meta


def describe(meta: dict) -> str:
    kept = [f"{e['update']:,} ({e['why']})" for n, e in meta["checkpoints"].items() if n != "checkpoint_last.pt"]
    return (f"update {meta['update']:,}, packed {meta['packed_at']}, {meta['bytes'] / 2**20:.0f} MB"
            + (f"; update checkpoints {', '.join(kept)}" if kept else ""))
