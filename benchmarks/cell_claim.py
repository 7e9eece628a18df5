"""Which process is training a study cell, so that two study processes can share one plan.

Two 1-thread trainings on 2 cores do ~15% more work than one 2-thread training (measured on the
convergence study's batches, README), so the long studies are best run as the same command started
twice with ``--threads 1``: each process takes the next cell no other process holds. The claim is an
exclusive ``flock`` on WORK/claims/<cell>.claim (outside the cell's work folder, which a 1,000-update
cell deletes): the kernel drops it when its holder exits, however it dies, so there is no stale
claim to clean up after a kill. The file's text says who holds it, for the message of the one that
was refused.
"""
import fcntl
import json
import os
import socket
import time
from typing import Optional


class Claim:
    """An open, locked claim file; ``release`` (or the end of the process) frees it."""

    def __init__(self, fd: int):
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock; the file stays (unlinking would race a claimer)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def claim_path(work: str, name: str) -> str:
    return os.path.join(work, "claims", f"{name}.claim")


def try_claim(work: str, name: str, wait: bool = False) -> Optional[Claim]:
    """The claim on ``name`` (a cell) for this process, or None while another live process holds it;
    with ``wait``, block until the holder lets go instead."""
    path = claim_path(work, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by fairseq-train (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    return Claim(fd)


def waiting_for_claim(work: str, name: str) -> Claim:
    """Hold ``name`` (e.g. the corpus two processes started together would both build), waiting for
    another holder to finish first."""
    return try_claim(work, name, wait=True)


def holder(work: str, name: str) -> str:
    """Who holds ``name``'s claim, in words (for the process that was refused it)."""
    try:
        with open(claim_path(work, name)) as f:
            h = json.loads(f.read())
        return f"pid {h['pid']} on {h['host']} since {h['since']}"
    except (OSError, ValueError, KeyError):  # claimed this instant, its text not written yet
        return "another process"
