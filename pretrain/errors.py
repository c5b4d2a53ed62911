"""How a run ends other than by finishing: a one-line error, or a stop on a signal."""
from __future__ import annotations

import os

import torch.distributed as dist


class RunError(ValueError):
    """A run that cannot start or go on (its directory, its lock, a diverged step); the message
    is one line naming the cause."""


class Interrupted(Exception):
    """The run stopped on a signal; `status` is the exit code (128 + the signal, the shell's
    convention, which launchers and schedulers read as "terminated by that signal"), `message`
    the line still to print (None once said)."""

    def __init__(self, status: int, message: str | None = None):
        super().__init__(message or status)
        self.status = status
        self.message = message


def is_main_process() -> bool:
    """Rank 0 under torchrun (also before the process group exists), or the only process: the one
    that reports, so that an error every rank meets is one line, not one per rank."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
