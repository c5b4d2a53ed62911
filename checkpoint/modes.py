"""The checkpointer for `checkpoint.mode`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from checkpoint.async_dcp import AsyncCheckpointer
from checkpoint.checkpointer import Checkpointer, CheckpointSettings
from checkpoint.lazy import LazyCheckpointer

MODES: dict[str, type[Checkpointer]] = {"sync": Checkpointer, "async": AsyncCheckpointer, "lazy": LazyCheckpointer}


def build_checkpointer(root: Path, settings: CheckpointSettings, files: dict[str, str] | None = None, layout: dict[str, Any] | None = None) -> Checkpointer:
    """`files`: name -> text written into every checkpoint; `layout`: recorded in each manifest."""
    return MODES[settings.mode](root, settings, files, layout)
