"""Run a test body in W gloo processes on this CPU (expert-parallel tests)."""
import socket

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
    finally:
        dist.destroy_process_group()


def run_in_processes(body, world_size: int = 2, *args):
    """Call ``body(rank, world_size, *args)`` in ``world_size`` processes; an exception in any
    rank fails the caller. ``body`` must be a module-level function (it is pickled)."""
    mp.spawn(_entry, args=(world_size, free_port(), body, args), nprocs=world_size, join=True)
