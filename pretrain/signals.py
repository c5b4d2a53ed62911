"""Why a run stops early: SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) stop it at the
end of the step, with a checkpoint; a launcher that is gone stops it at the end of the step,
without a new one.

The handler only notes the signal; the training loop asks after every step, and all ranks agree
(a signal may reach them at different steps), so they stop after the same one and save it
together. Before the loop (while the run is being set up) there is nothing to save: the signal
stops the process at once with one line. A second signal exits at once, mid-checkpoint if need
be: an unfinished checkpoint is never committed, so the committed ones stay intact. One signal
can arrive twice within moments (SLURM signals every process of a job, torchrun among them,
which passes it on to its ranks): a repeat within `REPEAT_WINDOW_S` is the same request.

A launcher (torchrun, srun) starts each rank in a session of its own, so nothing signals the ranks
when the launcher itself is killed (SIGKILL, the OOM killer): they would train on as orphans,
holding the run directory and the GPUs. Under a launcher a watch thread (`common.processes.
watch_parent`) notes its death; the loop stops at the same step on every rank, as for a signal,
lets the checkpoint already being written commit (the ranks' connections to each other outlive
the launcher; only new connections, which go through the launcher's store, fail) and exits with
`LAUNCHER_GONE_STATUS`. Before the loop the rank exits at once. Whatever a rank waits on after that
(a peer that stopped answering, a flush that does not end), it exits within `grace_s` of the
launcher's death.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType

import torch
import torch.distributed as dist

from common.processes import is_local_main_process, is_main_process, launcher_pid, watch_parent
from pretrain.errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 1.0
LAUNCHER_GONE_STATUS = 128 + signal.SIGHUP  # as a process whose terminal hung up: the side that ran it is gone


def exit_status(signum: int) -> int:
    return 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


@dataclass(frozen=True)
class Stop:
    """Why the run stops after this step, the same on every rank."""

    signum: int | None  # a signal some rank received
    launcher_gone: bool  # some rank's launcher is gone


class StopSignals:
    """Catches SIGTERM and SIGINT for the life of a run (`install` ... `restore`), and under a
    launcher notes its death (`watch_launcher`)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.received_at = 0.0
        self.in_loop = False  # set by the training loop: from then on a signal waits for the step's end
        self.launcher: int | None = None  # the pid of the launcher watched
        self.launcher_gone = False  # this rank's launcher is gone
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

    def watch_launcher(self, parent: int, grace_s: float) -> None:
        """Under torchrun or srun (`parent` is the launcher: this process's parent as it started),
        note the launcher's death; a rank still running `grace_s` later exits at once."""
        self.launcher = launcher_pid(parent)
        if self.launcher is not None:
            watch_parent(self.launcher, lambda: self._launcher_died(grace_s))

    def _launcher_died(self, grace_s: float) -> None:
        """On the watch thread: before the loop, exit (nothing to save); in it, let the loop stop
        after this step, and bound the time that takes."""
        if not self.in_loop:
            say_for_node(f"ebb: the launcher (pid {self.launcher}) is gone before the first step: stopped, nothing to save")
            os._exit(LAUNCHER_GONE_STATUS)
        self.launcher_gone = True
        deadline = threading.Timer(grace_s, self._give_up, args=(grace_s,))
        deadline.daemon = True
        deadline.start()

    def _give_up(self, grace_s: float) -> None:
        rank = os.environ.get("RANK", "0")
        say_anyway(
            f"ebb: the launcher (pid {self.launcher}) is gone and rank {rank} did not stop within {grace_s:g}s "
            "(parallel.collective_timeout_s): exiting at once; the committed checkpoints are intact"
        )
        os._exit(LAUNCHER_GONE_STATUS)

    def agreed(self, group: dist.ProcessGroup | None) -> Stop | None:
        """Whether any rank of `group` received a signal or lost its launcher (None: neither), the
        same on every rank."""
        flags = torch.tensor([self.received or 0, int(self.launcher_gone)])
        if group is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        signum, gone = (int(f) for f in flags)
        return Stop(signum or None, bool(gone)) if signum or gone else None


def say(line: str) -> None:
    if is_main_process():
        say_anyway(line)


def say_for_node(line: str) -> None:
    """`line` from local rank 0: each node's launcher has a console (or log) of its own."""
    if is_local_main_process():
        say_anyway(line)


def say_anyway(line: str) -> None:
    """`line` on stderr, unless stderr is gone (a killed launcher's pipe)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass
