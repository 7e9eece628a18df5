"""Checkpoint files that are whole or refused: atomic copies, verified loads.

Two gaps in fairseq 0.12 lose work, and the plugin closes both for every fairseq command that loads
it (``--user-dir fairseq_thor``), by wrapping two fairseq functions when it is imported:

* **Copies are not atomic.** fairseq writes the numbered checkpoint atomically (temporary file,
  then rename) but then *copies* it to ``checkpoint_last.pt`` (and ``_best``) in place: a kill
  during that copy leaves a truncated ``checkpoint_last.pt`` beside the good numbered file, and
  the next run dies in ``torch.load``. ``PathManager.copy`` becomes copy-to-temporary, fsync,
  rename, for local files (remote ``PathManager`` paths keep their handler's copy).
* **Loads are not verified.** torch's zip container keeps a CRC-32 of every tensor, but
  ``torch.load`` does not check it: bytes overwritten inside a tensor load silently and change the
  model. ``load_checkpoint_to_cpu`` (used by resume, fairseq-generate/-interactive/-validate and the
  hub) now checks every CRC first, and :func:`load` does the same for the plugin's own commands.
  A damaged file ends with one line naming it and the newest intact checkpoint beside it.

Files in torch's legacy (pre-1.6, non-zip) format carry no checksum; they load as before.
"""
import glob
import os
import pickle
import re
import shutil
import zipfile
from typing import List, Optional

import torch
from fairseq import checkpoint_utils
from fairseq.file_io import PathManager

from .errors import ThorError

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_2_OR_LATER = b"\x80"  # what a legacy torch.save file starts with
# fairseq's numbered saves, one-process or one file of a sharded save (group 1: the number,
# group 2: the shard suffix): checkpoint<epoch>.pt and checkpoint_<epoch>_<update>.pt
EPOCH_SAVE = re.compile(r"^checkpoint(\d+)(-rank-\d+|-shared)?\.pt$")
UPDATE_SAVE = re.compile(r"^checkpoint_\d+_(\d+)(-rank-\d+|-shared)?\.pt$")
ALTERNATIVES_TO_VERIFY = 3  # intact siblings looked for in an error message (each is read whole)


class UnreadableCheckpoint(ThorError):
    """A checkpoint that is truncated, changed after it was written, or refused by the loader."""


def is_numbered(name: str) -> bool:
    return bool(EPOCH_SAVE.match(name) or UPDATE_SAVE.match(name))


# ---- verification ------------------------------------------------------------------------------

def problem_with(path: str) -> Optional[str]:
    """What is wrong with the checkpoint file ``path``, or None when it is intact (or in torch's
    legacy format, which has no checksum)."""
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if head != ZIP_MAGIC:
        if head.startswith(PICKLE_PROTOCOL_2_OR_LATER):
            return None
        return "it is empty" if not head else "it is not a torch checkpoint (no zip or pickle header)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()  # reads every member and compares its CRC-32
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        return f"it is truncated or damaged ({e})"
    if bad_member is not None:
        return f"its entry {bad_member} fails the CRC check (bytes changed after it was written)"
    return None


def intact_alternatives(path: str, limit: int = ALTERNATIVES_TO_VERIFY) -> List[str]:
    """Up to ``limit`` other checkpoints of the same kind in the same folder (a rank file for a
    rank file, a shared file for a shared file) that verify: numbered saves newest first, then
    the others."""
    directory, name = os.path.split(os.path.abspath(path))
    suffix = _shard_suffix(name)
    candidates = [p for p in glob.glob(os.path.join(directory, f"checkpoint*{suffix}.pt"))
                  if os.path.abspath(p) != os.path.abspath(path) and _shard_suffix(os.path.basename(p)) == suffix]
    found = []
    # numbered saves first: checkpoint_best/_last are copies of one of them
    newest_first = sorted(candidates, key=lambda p: (is_numbered(os.path.basename(p)), os.path.getmtime(p)),
                          reverse=True)
    for candidate in newest_first:
        if len(found) == limit:
            break
        if problem_with(candidate) is None:
            found.append(candidate)
    return found


def _shard_suffix(name: str) -> str:
    stem = name[: -len(".pt")] if name.endswith(".pt") else name
    for marker in ("-rank-", "-shared"):
        if marker in stem:
            return stem[stem.index(marker):]
    return ""


def use_instead(other: str) -> str:
    """How to use the intact checkpoint ``other`` in place of a damaged one, in a form that works:
    a sharded save is named by its prefix (``--restore-file`` under ``--expert-parallel`` adds each
    rank's suffix) and is consolidated before decoding."""
    suffix = _shard_suffix(os.path.basename(other))
    if not suffix:
        return f"use {other} (the newest intact checkpoint beside it) instead, e.g. with --restore-file or --path"
    save = other[: -len(suffix + ".pt")] + ".pt"
    return (f"use the save {save} instead (its file {os.path.basename(other)} is the newest intact one of "
            f"its kind beside it): --restore-file {save} with --expert-parallel, or "
            f"fairseq-thor-consolidate {save} --out FILE to decode it")


def refuse(path: str, problem: str, what_to_do: Optional[str] = None):
    if what_to_do is None:
        others = intact_alternatives(path)
        what_to_do = (use_instead(others[0]) if others else
                      "write it again: rerun the training, or the consolidate/reshard/export command")
    raise UnreadableCheckpoint(f"checkpoint {path} cannot be used: {problem}; {what_to_do}")


def verify(path: str):
    """Raise :class:`UnreadableCheckpoint` unless ``path`` is intact."""
    problem = problem_with(path)
    if problem is not None:
        refuse(path, problem)


# ---- loading -----------------------------------------------------------------------------------

def refused_global(error: Exception) -> Optional[str]:
    """The class or function torch's safe loader refused, from its message ("Unsupported global:
    GLOBAL module.Name was not an allowed global"), or None."""
    match = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    return match.group(1) if match else None


def _explained_load_error(path: str, error: Exception):
    if isinstance(error, pickle.UnpicklingError):
        # torch's own message is ~600 characters and advises weights_only=False: say it in our words
        name = refused_global(error)
        what = f"the class {name}" if name else "an object"
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        detail = "" if name else f" ({(lines[-1] if lines else type(error).__name__)[:200]})"
        refuse(path, f"torch's safe loader refused {what} in it{detail}",
               "fairseq_thor allow-lists what fairseq checkpoints hold; if you trust the file, allow "
               f"{name or 'that class'} with torch.serialization.add_safe_globals before loading")
    refuse(path, f"torch.load failed ({type(error).__name__}: {error})")


def load(path: str) -> dict:
    """Read one checkpoint file with torch's safe loader, verified first."""
    verify(path)
    try:
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        _explained_load_error(path, e)


def verified_load_checkpoint_to_cpu(original):
    """fairseq's ``load_checkpoint_to_cpu``, verifying the file first and naming it on failure."""

    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        local = PathManager.get_local_path(path)
        if os.path.isfile(local):  # a missing file keeps fairseq's own error
            verify(local)
        try:
            return original(path, arg_overrides=arg_overrides, load_on_all_ranks=load_on_all_ranks)
        except (pickle.UnpicklingError, EOFError) as e:
            _explained_load_error(path, e)

    load_checkpoint_to_cpu.thor_verified = True
    return load_checkpoint_to_cpu


# ---- atomic copies -----------------------------------------------------------------------------

def atomic_copy(original):
    """``PathManager.copy`` that never leaves a partial destination behind."""

    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if PathManager.path_requires_pathmanager(src_path) or PathManager.path_requires_pathmanager(dst_path):
            return original(src_path, dst_path, overwrite)
        if os.path.exists(dst_path) and not overwrite:
            return False  # iopath's answer for an existing destination without overwrite
        partial = dst_path + ".tmp"
        try:
            shutil.copyfile(src_path, partial)
            with open(partial, "rb+") as f:
                os.fsync(f.fileno())  # on disk before the rename makes it checkpoint_last
            os.replace(partial, dst_path)
        except BaseException:
            if os.path.exists(partial):
                os.remove(partial)
            raise
        return True

    copy.thor_atomic = True
    return copy


def install():
    """Wrap fairseq's checkpoint copy and load (idempotent)."""
    if not getattr(PathManager.copy, "thor_atomic", False):
        PathManager.copy = staticmethod(atomic_copy(PathManager.copy))
    if not getattr(checkpoint_utils.load_checkpoint_to_cpu, "thor_verified", False):
        checkpoint_utils.load_checkpoint_to_cpu = verified_load_checkpoint_to_cpu(
            checkpoint_utils.load_checkpoint_to_cpu)
