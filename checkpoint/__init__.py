"""Checkpoints of a training run in the torch.distributed.checkpoint layout: saved in one of the
`MODES`, committed atomically, resumed from the newest intact one. Callers import from here.

A checkpoint mode is a `Checkpointer` subclass in a file of its own (checkpoint/lazy.py is one)
and its line in `MODES`; `checkpoint.mode` accepts the names there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved or resumed; the message is a single line naming the path."""


class CheckpointDamaged(CheckpointError):
    """A committed checkpoint whose files do not match its manifest, or that has no readable
    manifest: its bytes are not what was saved, so `--resume` moves it aside and takes the one
    before."""


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint (its files match the manifest) that does not load into this run's
    model and optimizer: the run's config differs from the one it was saved with. Nothing is
    wrong with the checkpoint, so nothing is moved or skipped. `path` is the checkpoint."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


# The modules below raise CheckpointError, and checkpoint.config reads MODES: each is imported
# once what it takes from here is defined.
from checkpoint.async_dcp import AsyncCheckpointer  # noqa: E402
from checkpoint.checkpointer import Checkpointer  # noqa: E402
from checkpoint.dcp import load_model  # noqa: E402
from checkpoint.lazy import LazyCheckpointer  # noqa: E402
from checkpoint.manager import QUARANTINE, find_latest, intact_checkpoint, resolve_checkpoint, verify_together  # noqa: E402
from checkpoint.ranks import Ranks  # noqa: E402

MODES: dict[str, type[Checkpointer]] = {"sync": Checkpointer, "async": AsyncCheckpointer, "lazy": LazyCheckpointer}

from checkpoint.config import CheckpointConfig  # noqa: E402


def build_checkpointer(root: Path, settings: CheckpointConfig, files: dict[str, str] | None = None, layout: dict[str, Any] | None = None) -> Checkpointer:
    """The checkpointer of `settings.mode`. `files`: name -> text written into every checkpoint;
    `layout`: recorded in each manifest."""
    return MODES[settings.mode](root, settings, files, layout)


__all__ = [
    "MODES", "QUARANTINE", "CheckpointConfig", "CheckpointDamaged", "CheckpointError", "CheckpointMismatch", "Checkpointer",
    "Ranks", "build_checkpointer", "find_latest", "intact_checkpoint", "load_model", "resolve_checkpoint", "verify_together",
]
