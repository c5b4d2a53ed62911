"""SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C): stop at the end of the step, with a
checkpoint.

The handler only notes the signal; the training loop asks after every step, and all ranks agree
(a signal may reach them at different steps), so they stop after the same one and save it
together. Before the loop (while the run is being set up) there is nothing to save: the signal
stops the process at once with one line. A second signal exits at once, mid-checkpoint if need
be: an unfinished checkpoint is never committed, so the committed ones stay intact. One signal
can arrive twice within moments (SLURM signals every process of a job, torchrun among them,
which passes it on to its ranks): a repeat within `REPEAT_WINDOW_S` is the same request.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType

import torch
import torch.distributed as dist

from common.processes import is_main_process
from pretrain.errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 1.0


def exit_status(signum: int) -> int:
    return 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """Catches SIGTERM and SIGINT for the life of a run (`install` ... `restore`)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.received_at = 0.0
        self.in_loop = False  # set by the training loop: from then on a signal waits for the step's end
        self._previous: dict[int, object] = {}

    @classmethod
    def install(cls) -> StopSignals:
        """Handle each of `STOP_SIGNALS` that is not ignored (as `nohup` and background jobs of
        a non-interactive shell ignore SIGINT, which must stay so)."""
        signals = cls()
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signals._previous[signum] = signal.signal(signum, signals._handle)
        return signals

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal_name(signum)
        if self.received is not None:
            if time.monotonic() - self.received_at < REPEAT_WINDOW_S:
                return
            say(f"ebb: second {name}: exiting at once; the committed checkpoints are intact")
            os._exit(exit_status(signum))
        self.received, self.received_at = signum, time.monotonic()
        if not self.in_loop:
            raise Interrupted(exit_status(signum), f"ebb: {name} before the first step: stopped, nothing to save")

    def agreed(self, group: dist.ProcessGroup | None) -> int | None:
        """The signal any rank of `group` received (None for none), the same on every rank."""
        if group is None:
            return self.received
        flag = torch.tensor([self.received or 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return int(flag) or None


def say(line: str) -> None:
    if is_main_process():
        print(line, file=sys.stderr, flush=True)
