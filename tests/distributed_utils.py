"""Run a test body in W gloo processes on this CPU (expert-parallel tests)."""
import os
import socket
import sys

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, body, args):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        body(rank, world_size, *args)
        try:
            dist.barrier()  # no rank tears gloo down while another still works
        except RuntimeError:
            pass  # a rank failed and left: its own error is what mp.spawn must report, not this one
    finally:
        dist.destroy_process_group()
    # A rank that passed ends here, not in the interpreter's shutdown: there gloo's background
    # threads can be destroyed while still joinable and the process aborts ("terminate called
    # without an active exception", SIGABRT; seen once in a fresh-clone run), failing a test whose
    # body passed. fairseq_thor/errors.py ends a failing distributed command the same way.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_in_processes(body, world_size: int = 2, *args):
    """Call ``body(rank, world_size, *args)`` in ``world_size`` processes; an exception in any
    rank fails the caller. ``body`` must be a module-level function (it is pickled)."""
    mp.spawn(_entry, args=(world_size, free_port(), body, args), nprocs=world_size, join=True)
