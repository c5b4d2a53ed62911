"""How a run ends other than by finishing: a one-line error, a stop on a signal, or a lost peer."""
from __future__ import annotations

import re

import torch.distributed as dist

from common.errors import first_line

GLOO_SOURCE = re.compile(r"^\[[^\]]*gloo[^\]]*\]\s*")  # gloo's errors start with the source line that raised them


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



class PeersLost(Exception):
    """A collective of this rank failed: a peer is gone (its connections closed) or did not answer
    within `parallel.collective_timeout_s`. The message is one line naming the rank and the step."""


def collective_failure(exc: BaseException) -> str | None:
    """What broke, in a few words, when `exc` or an exception it came from is a failed collective:
    torch's DistError (a dead store, NCCL), or gloo's RuntimeError (a closed connection, a
    timeout); None for any other error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, dist.DistError):
            return first_line(exc)
        if isinstance(exc, RuntimeError) and GLOO_SOURCE.match(str(exc)):
            return first_line(GLOO_SOURCE.sub("", str(exc))).split(". ")[0]
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
