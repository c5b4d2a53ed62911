"""Run a function in `world_size` real processes on gloo and collect what each rank returns.

    results = run_distributed(fn, 2, arg)   # fn(*args) runs on every rank; results[rank]

`fn` must be importable (a module-level function); it runs after the default process group is
initialised, with one intra-op thread, and its return value comes back through torch.save.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, tmp: str, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size)
    try:
        torch.save(fn(*args), os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's teardown: after DCP's collectives on gloo it occasionally aborts
    # (std::terminate in a C++ destructor, about 1 run in 20) once everything is written.
    os._exit(0)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """The per-rank results of `fn(*args)`; a failing rank fails the call with its traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world_size, tmp, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
