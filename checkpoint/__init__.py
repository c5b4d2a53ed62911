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


# The modules below raise CheckpointError, and checkpoint.config reads MODES: each is imported
# once what it takes from here is defined.
from checkpoint.async_dcp import AsyncCheckpointer  # noqa: E402
from checkpoint.checkpointer import Checkpointer  # noqa: E402
from checkpoint.dcp import load_model  # noqa: E402
from checkpoint.lazy import LazyCheckpointer  # noqa: E402
from checkpoint.manager import find_latest, resolve_checkpoint  # noqa: E402

MODES: dict[str, type[Checkpointer]] = {"sync": Checkpointer, "async": AsyncCheckpointer, "lazy": LazyCheckpointer}

from checkpoint.config import CheckpointConfig  # noqa: E402


def build_checkpointer(root: Path, settings: CheckpointConfig, files: dict[str, str] | None = None, layout: dict[str, Any] | None = None) -> Checkpointer:
    """The checkpointer of `settings.mode`. `files`: name -> text written into every checkpoint;
    `layout`: recorded in each manifest."""
    return MODES[settings.mode](root, settings, files, layout)


__all__ = [
    "MODES", "CheckpointConfig", "CheckpointError", "Checkpointer", "build_checkpointer", "find_latest", "load_model", "resolve_checkpoint",
]
