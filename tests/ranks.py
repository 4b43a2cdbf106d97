"""Run a function on several gloo ranks on 127.0.0.1, each a spawned process,
bounded in time (the processes are ended when the time is up)."""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, port: int, world: int, args: tuple, group_timeout_s: float) -> None:
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=group_timeout_s),
    )
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears its connections down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def run(fn, *args, world: int = 2, timeout_s: float = 120.0, group_timeout_s: float = 30.0) -> None:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; re-raises a rank's error,
    raises ``TimeoutError`` (after ending the processes) when ``timeout_s`` passes."""
    ctx = mp.start_processes(
        _entry, args=(fn, free_port(), world, args, group_timeout_s), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{fn.__name__} did not finish on {world} ranks within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
