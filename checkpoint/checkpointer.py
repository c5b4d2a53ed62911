"""Checkpointers: turn save requests into committed checkpoints.

`Checkpointer` itself is the `sync` mode: a DCP save on the training thread; the loop waits for
the commit. Every other mode (`checkpoint.MODES`: one file each, e.g. checkpoint/lazy.py) is a
subclass that overrides `background`, `_stage` and `wait_for_snapshot`, and shares the rest: the
busy policy, the staging directory, the commit protocol of checkpoint/manager.py (run on a
background thread by the background modes) and the error policy. A background failure is
reported at the next optimizer step (or request, or `finalize`): with `on_error: fail` it raises
CheckpointError, with `warn` it prints one line and training goes on.

The training loop calls `save` at the end of a step, `attach(optimizer)` once (the optimizer's
step pre-hook then runs `before_optimizer_step`: wait for the snapshot, report errors), and
`finalize` at the end. Every rank makes the same calls; every decision that depends on timing
(is the previous save done?) is agreed over a gloo group so all ranks take the same branch.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from checkpoint import CheckpointError, dcp, manager
from checkpoint.manager import step_dir_name
from checkpoint.ranks import Ranks
from common.errors import first_line

if TYPE_CHECKING:  # checkpoint.config validates `checkpoint.mode` against the modes built on this class
    from checkpoint.config import CheckpointConfig

WriteFiles = Callable[[], dict[str, str]]  # writes this rank's DCP files; their checksums by name


class Checkpointer:
    """Synchronous saves; the base of the background modes, which override `background`,
    `_stage` and `wait_for_snapshot`."""

    background = False

    def __init__(self, root: Path, settings: CheckpointConfig, files: dict[str, str] | None = None, layout: dict[str, Any] | None = None):
        self.root = Path(root)
        self.settings = settings
        self.files = files or {}  # name -> text written into every checkpoint (e.g. config.yaml)
        self.layout = layout or {}
        self.ranks = Ranks.new_group()  # the checkpoint's own collectives (background thread)
        self.control = Ranks.new_group() if self.background else self.ranks  # agreements on the training thread
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="ebb-checkpoint") if self.background else None
        self.pending: tuple[int, Future] | None = None
        self.saved: Path | None = None
        self.resumed_from: Path | None = None

    # -- the training loop's calls --------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_pre_hook(lambda *_: self.before_optimizer_step())

    def before_optimizer_step(self) -> None:
        """The optimizer is about to modify the state: the snapshot must be complete."""
        self.wait_for_snapshot()
        self.poll()

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: dcp.Stateful, data: dcp.Stateful, final: bool = False) -> bool:
        """Request a checkpoint of the state after `step`; False when it was skipped or failed.
        A request while the previous save is still being written waits for it, or with
        `when_busy: skip` is skipped (never the `final` one)."""
        self.poll()
        if self.pending is not None:
            if self.settings.when_busy == "skip" and not final:
                self._say(f"ebb: checkpoint at step {step} skipped: {step_dir_name(self.pending[0])} is still being written (checkpoint.when_busy=skip)")
                return False
            began = time.perf_counter()
            self._wait_pending()
            self._say(f"ebb: checkpoint at step {step} waited {time.perf_counter() - began:.2f}s for the previous one to be written")
        try:
            staging = manager.prepare(self.control, self.root, step)
            trainer = dcp.capture_trainer_state(step, schedule, data)
            write_files = self._stage_everywhere(staging, model, optimizer)
        except CheckpointError as exc:
            manager.discard(self.control, self.root, step)
            self._report(step, exc)
            return False
        def job() -> Path:
            return self._write_and_commit(step, staging, trainer, write_files)

        if self.worker is None:
            self._run_now(step, job)
        else:
            self.pending = (step, self.worker.submit(job))
        return True

    def wait_for_snapshot(self) -> None:
        """Block until the requested state is in host memory (sync saves are done on return)."""

    def poll(self) -> None:
        """Report a finished background save's failure, once every rank's save has finished."""
        if self.pending is not None and self.control.all(self.pending[1].done()):
            self._collect()

    def wait_until_durable(self) -> None:
        """Block until every requested checkpoint is committed (or its failure reported)."""
        self.wait_for_snapshot()
        if self.pending is not None:
            self._wait_pending()

    def finalize(self) -> Path | None:
        """`wait_until_durable`, then release the threads and buffers; the last committed checkpoint."""
        self.wait_until_durable()
        if self.worker is not None:
            self.worker.shutdown()
        self.close()
        return self.saved

    def close(self) -> None:
        """Release what the mode holds (stagers, threads)."""

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: dcp.Stateful, data: dcp.Stateful) -> int:
        """Load the newest intact checkpoint (`manager.resume`, which says when it reshards it
        from another layout); its step. `resumed_from` names it."""
        step, self.resumed_from = manager.resume(self.control, self.root, model, optimizer, schedule, data, self.layout)
        return step

    # -- what a mode provides -------------------------------------------------------------------

    def _stage(self, staging: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> WriteFiles:
        """Take what must be taken now; return what writes the DCP files (run in the background)."""
        state = dcp.capture_state(model, optimizer)
        return lambda: dcp.write_state(staging, state, group=self.ranks.group)

    # -- the shared protocol --------------------------------------------------------------------

    def _stage_everywhere(self, staging: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> WriteFiles:
        """`_stage` on every rank; if it failed on any, it fails on all (none starts writing)."""
        error, write_files = None, None
        try:
            write_files = self._stage(staging, model, optimizer)
        except CheckpointError as exc:
            error = str(exc)
        self.control.agree(error)
        return write_files

    def _write_and_commit(self, step: int, staging: Path, trainer: dict[str, Any], write_files: WriteFiles) -> Path:
        try:
            error, checksums = None, {}
            try:
                checksums = write_files()
                if self.ranks.is_main:
                    dcp.write_trainer_state(staging, trainer)
                    for name, text in self.files.items():
                        (staging / name).write_text(text)
            except (CheckpointError, OSError) as exc:
                error = first_line(exc)
            except Exception as exc:  # every rank must reach the agreement below, whatever failed
                error = f"{type(exc).__name__}: {first_line(exc)}"
            self.ranks.agree(error)
            final = manager.commit(self.ranks, self.root, step, self.layout, self.settings.keep_last, checksums)
        except CheckpointError:
            manager.discard(self.ranks, self.root, step)
            raise
        self.saved = final
        return final

    def _run_now(self, step: int, job: Callable[[], Path]) -> None:
        try:
            job()
        except CheckpointError as exc:
            self._report(step, exc)

    def _wait_pending(self) -> None:
        wait([self.pending[1]])
        self._collect()

    def _collect(self) -> None:
        step, future = self.pending
        self.pending = None
        if (exc := future.exception()) is not None:
            if not isinstance(exc, CheckpointError):
                raise exc
            self._report(step, exc)

    def _report(self, step: int, exc: CheckpointError) -> None:
        message = f"checkpoint {step_dir_name(step)} was not saved: {exc}"
        if self.settings.on_error == "fail":
            raise CheckpointError(f"{message} (checkpoint.on_error=fail; earlier checkpoints are intact)")
        self._say(f"ebb: warning: {message}; training goes on (checkpoint.on_error=warn)", err=True)

    def _say(self, line: str, err: bool = False) -> None:
        if self.control.is_main:
            print(line, file=sys.stderr if err else sys.stdout, flush=True)

