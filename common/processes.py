"""Which process of a run this is, who launched it, and how long its collectives wait."""
from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

PARENT_POLL_S = 0.5  # how often the launcher watch also asks for the parent pid

# The timeout of the groups `new_gloo_group` makes; set with the default group's (`start_process_group`).
_collective_timeout: timedelta | None = None


def is_main_process() -> bool:
    """Rank 0 under torchrun (also before the process group exists), or the only process: the one
    that reports, so that an error every rank meets is one line, not one per rank."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def is_local_main_process() -> bool:
    """Local rank 0: the process that speaks for its node (its launcher's console or log)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def start_process_group(backend: str, timeout: timedelta) -> None:
    """`dist.init_process_group` from the launcher's environment, whose collectives (and those of
    every `new_gloo_group`) give up after `timeout`."""
    global _collective_timeout
    dist.init_process_group(backend, timeout=timeout)
    _collective_timeout = timeout


def new_gloo_group() -> dist.ProcessGroup:
    """A new gloo group of every rank, with the default group's timeout (torch gives a new group
    its backend's default, 30 minutes for gloo, whatever the default group has)."""
    return dist.new_group(backend="gloo", timeout=_collective_timeout)


def launcher_pid(parent: int) -> int | None:
    """`parent` (this process's parent as it started) when that is a launcher that supervises it:
    torchrun's agent (TORCHELASTIC_RUN_ID) or SLURM's srun (SLURM_STEP_ID); None otherwise (a
    shell, a test), whose death must not stop a run started under `nohup`."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "SLURM_STEP_ID" in os.environ:
        return parent
    return None


def watch_parent(pid: int, on_gone: Callable[[], None]) -> threading.Thread:
    """Call `on_gone` (on a daemon thread) once the parent `pid` is no longer this process's parent.

    A pidfd of the parent wakes the watch the moment it exits; the parent pid, asked every
    `PARENT_POLL_S`, is the test (when the parent dies the kernel hands this process to another),
    and the only one where pidfds are missing. Unlike Linux's parent-death signal, neither fires when
    merely the launcher's thread that started this process ends."""

    def watch() -> None:
        pidfd = _open_pidfd(pid)
        waiter = select.poll()
        if pidfd is not None:
            waiter.register(pidfd, select.POLLIN)
        while os.getppid() == pid:
            waiter.poll(PARENT_POLL_S * 1000)
        on_gone()

    thread = threading.Thread(target=watch, name="ebb-launcher-watch", daemon=True)
    thread.start()
    return thread


def _open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux >= 5.3, or the parent is already gone
        return None
