"""Checkpoint directories: `<root>/step-00000100/`, atomic commit, a `latest` pointer, keep-last-k.

A save is written into `<root>/.tmp-step-.../` and committed by renaming it to `step-.../`
(atomic on one filesystem), so every `step-*` directory is complete. `latest` (a text file
holding the directory name) is rewritten, atomically, only after that rename, and older
checkpoints are deleted only after a newer one has committed.

Under a process group every rank calls `save` (DCP writes each rank's shards) on a filesystem all
ranks share; rank 0 alone creates the staging directory, writes the small files, renames, updates
`latest` and prunes, with barriers so that no rank writes before the directory exists or returns
before the commit.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from checkpoint import dcp
from checkpoint.errors import CheckpointError

LATEST = "latest"
STEP_DIR = re.compile(r"step-(\d+)")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def committed_checkpoints(root: Path) -> list[Path]:
    """Every committed checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def find_latest(root: Path) -> Path | None:
    """The newest committed checkpoint. Commits are renames, so this is the highest `step-*`
    directory even when a crash came between a rename and the `latest` update."""
    checkpoints = committed_checkpoints(Path(root))
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint, else the latest one under it or under `path/checkpoints`."""
    if (path / dcp.DCP_METADATA).is_file():
        return path
    for root in (path, path / "checkpoints"):
        if latest := find_latest(root):
            return latest
    raise CheckpointError(f"no checkpoint at {path} (expected a step-* directory, or one under {path} or {path / 'checkpoints'})")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Saves into and resumes from `root`; `files` (name -> text, e.g. the run's config.yaml) are
    written into every checkpoint so that it is self-describing."""

    def __init__(self, root: Path, keep_last: int, files: dict[str, str] | None = None):
        self.root = Path(root)
        self.keep_last = keep_last
        self.files = files or {}

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: dcp.Stateful, data: dcp.Stateful) -> Path:
        name = step_dir_name(step)
        staging, final = self.root / f".tmp-{name}", self.root / name
        if final.exists():  # checked by every rank, before any of them writes
            raise CheckpointError(f"checkpoint {final} already exists; resume from it or use another checkpoint.dir")
        if dcp.is_main_rank():
            shutil.rmtree(staging, ignore_errors=True)  # left by a save that crashed
            staging.mkdir(parents=True)
        _barrier()
        self._write(staging, step, model, optimizer, schedule, data)
        _barrier()
        if dcp.is_main_rank():
            self._commit(staging, final)
            self._prune()
        _barrier()
        return final

    def _write(self, path: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: dcp.Stateful, data: dcp.Stateful) -> None:
        """The seam for asynchronous modes: everything that produces the checkpoint's files."""
        dcp.save(path, step, model, optimizer, schedule, data)
        if dcp.is_main_rank():
            for filename, text in self.files.items():
                (path / filename).write_text(text)

    def _commit(self, staging: Path, final: Path) -> None:
        os.rename(staging, final)
        pointer = self.root / f".{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, self.root / LATEST)

    def _prune(self) -> None:
        for old in committed_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(old)

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: dcp.Stateful, data: dcp.Stateful) -> int:
        """Load the latest checkpoint; returns its step."""
        latest = find_latest(self.root)
        if latest is None:
            raise CheckpointError(f"nothing to resume: no checkpoint in {self.root}")
        return dcp.load(latest, model, optimizer, schedule, data)
