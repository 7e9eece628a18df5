"""An explicit ``--restore-file`` names a checkpoint, or training does not start.

fairseq treats a ``--restore-file`` it cannot find like a first launch: it logs "No existing
checkpoint found", trains from scratch and at its first save overwrites the run's
``checkpoint_last`` (and ``_best``), exit status 0. Only the default value (``checkpoint_last.pt``
in ``--save-dir``) means "resume if there is something to resume"; any other value asks for one
file, and a typo in it must not cost the run. Loading the plugin makes every ``fairseq-train`` stop
before the first update with one line: the file it looked for, and the checkpoints that do exist
there.

Under ``--expert-parallel`` a save is several files and ``--restore-file`` names the save, not a
file: fairseq inserts each rank's suffix (``DIR/checkpoint_1_10.pt`` is read as
``DIR/checkpoint_1_10-rank-R.pt`` plus ``-shared.pt``). A name that is already one file of a
sharded save (``-rank-N.pt``, ``-shared.pt``) would become ``...-rank-1-rank-0.pt`` there: it is
taken as its save's name instead, and the run says so.

In a multi-process run every rank checks, then all meet before any stops: each stops with its own
line, or, where its own file exists but another rank's does not, with a line saying it stops with
them.
"""
import logging
import os
from typing import List

import torch
import torch.distributed as dist
from fairseq import checkpoint_utils
from omegaconf import DictConfig, open_dict

from .distributed import sharded_checkpoint as shards
from .errors import ThorError

logger = logging.getLogger(__name__)
DEFAULT = "checkpoint_last.pt"  # fairseq's default: resume when present, else start afresh
SHOWN = 6  # checkpoints named in the error; the rest are counted


def restorable(directory: str, sharded: bool) -> List[str]:
    """What ``--restore-file`` can name in ``directory`` for this kind of run, newest first."""
    if not os.path.isdir(directory):
        return []
    found = {}
    for name in os.listdir(directory):
        if not (name.startswith("checkpoint") and name.endswith(".pt")):
            continue
        path = os.path.join(directory, name)
        is_shard = bool(shards.is_shard_file(name))
        if sharded and is_shard:
            found.setdefault(shards.checkpoint_prefix(path) + ".pt", os.path.getmtime(path))
        elif not sharded and not is_shard:
            found[path] = os.path.getmtime(path)
    return sorted(found, key=lambda p: (-found[p], p))


def what_is_there(directory: str, sharded: bool) -> str:
    if not os.path.isdir(directory):
        return f"the folder {directory} does not exist"
    names = restorable(directory, sharded)
    kind = "expert-sharded saves" if sharded else "checkpoints"
    if not names:
        return f"{directory} holds no {kind}"
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return f"{kind} there: {', '.join(names[:SHOWN])}{more}"


def check_restore_file(cfg, suffix: str):
    """Raise unless an explicit ``--restore-file`` names something to load; under
    ``--expert-parallel`` (``suffix`` ``-rank-N``) turn a rank or shared file into its save."""
    restore = cfg.restore_file
    if restore == DEFAULT:
        return
    sharded = "-rank-" in (suffix or "")
    if sharded and shards.is_shard_file(restore):
        save = shards.checkpoint_prefix(restore) + ".pt"
        logger.info(f"--restore-file {restore} is one file of an expert-sharded save; restoring the "
                    f"save {save} (each rank reads its own file)")
        if isinstance(cfg, DictConfig):
            with open_dict(cfg):
                cfg.restore_file = save
        else:
            cfg.restore_file = save
        restore = save
    if sharded:
        prefix = shards.checkpoint_prefix(restore)
        candidates = [shards.rank_path(prefix, 0), shards.shared_path(prefix), restore]
        looked_for = f"{shards.rank_path(prefix, 0)} or {shards.shared_path(prefix)}"
    else:
        candidates = [restore.replace(".pt", suffix + ".pt") if suffix else restore]
        looked_for = candidates[0]
    if any(os.path.isfile(p) for p in candidates):
        return
    directory = os.path.dirname(os.path.abspath(restore))
    raise ThorError(f"--restore-file {restore}: no checkpoint at {looked_for}; "
                    f"{what_is_there(directory, sharded)}. Nothing was trained, so no save was "
                    f"overwritten (leave --restore-file out to resume from --save-dir's checkpoint_last)")


def _ranks_refusing(refused: bool) -> int:
    """How many ranks of the run refused their --restore-file (0 or 1 outside a process group).

    Every rank waits here for all the others before any of them stops. A rank that exits while
    another is still building its Trainer takes the rendezvous store down with it (rank 0 hosts
    it), and the slower rank dies in fairseq's setup with "Connection reset by peer" and a
    traceback instead of the one-line refusal."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return int(refused)
    on_gpu = dist.get_backend() == "nccl"
    count = torch.tensor([int(refused)], device=torch.cuda.current_device() if on_gpu else "cpu")
    dist.all_reduce(count)
    return int(count.item())


def _checked_load_checkpoint(original):
    def load_checkpoint(cfg, trainer, **passthrough_args):
        try:
            check_restore_file(cfg, trainer.checkpoint_suffix)
            refusal = None
        except ThorError as error:
            refusal = error
        refusing = _ranks_refusing(refusal is not None)
        if refusal is not None:
            raise refusal
        if refusing:
            raise ThorError(f"--restore-file {cfg.restore_file}: {refusing} other rank(s) found no "
                            f"checkpoint to restore; this rank stops with them, so no save is "
                            f"overwritten")
        return original(cfg, trainer, **passthrough_args)

    load_checkpoint.thor_restore_checked = True
    return load_checkpoint


def install():
    """Wrap fairseq's resume (idempotent)."""
    if not getattr(checkpoint_utils.load_checkpoint, "thor_restore_checked", False):
        checkpoint_utils.load_checkpoint = _checked_load_checkpoint(checkpoint_utils.load_checkpoint)
