"""Run a function in N gloo processes on this CPU (for DDP tests)."""

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world, port, fn, args, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
    )
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args):
    """``fn(rank, world, *args)`` in ``world`` processes; returns their results by rank.

    ``fn`` must be importable (module level) and return picklable values.
    """
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_entry, args=(world, free_port(), fn, args, results), nprocs=world, join=True)
    return [results[r] for r in range(world)]
