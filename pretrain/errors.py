"""How a run ends other than by finishing: a one-line error, or a stop on a signal."""
from __future__ import annotations


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

