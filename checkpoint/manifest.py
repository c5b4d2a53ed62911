"""A committed checkpoint's manifest: what it holds and how to tell that it is intact.

`manifest.json` records the step, the layout it was saved under, and every file's size and XXH3-64
checksum (DCP's files are hashed while they are written: checkpoint/storage.py).
It is written last into the staging directory, before the commit rename, so a committed
checkpoint without a matching manifest is damaged. Files are fsynced before they are described,
and directories after entries are added or renamed in them, so a commit survives a power loss.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from checkpoint import CheckpointDamaged, CheckpointError
from checkpoint.storage import ALGORITHM, file_checksum, fsync_path

MANIFEST = "manifest.json"


def describe(directory: Path, names: list[str], checksums: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Fsync each file and return its size and checksum, for the manifest; `checksums` holds
    those already taken while writing, the others are read back."""
    entries = {}
    for name in names:
        path = directory / name
        fsync_path(path)
        entries[name] = {"size": path.stat().st_size, ALGORITHM: checksums.get(name) or file_checksum(path)}
    return entries


def write_manifest(directory: Path, step: int, layout: dict[str, Any], files: dict[str, dict[str, Any]]) -> None:
    path = directory / MANIFEST
    path.write_text(json.dumps({"step": step, "layout": layout, "files": dict(sorted(files.items()))}, indent=1) + "\n")
    fsync_path(path)
    fsync_path(directory)


def read_manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        manifest["files"].items()
    except FileNotFoundError:
        raise CheckpointDamaged(f"{directory.name} has no {MANIFEST}") from None
    except (ValueError, KeyError, AttributeError, TypeError):
        raise CheckpointDamaged(f"{directory.name}: {MANIFEST} is unreadable") from None
    return manifest


def verify(directory: Path, names: list[str], files: dict[str, dict[str, Any]]) -> None:
    """Raise a one-line CheckpointDamaged naming the first of `names` that differs from the
    manifest (a manifest without checksums, from an older ebb, is a CheckpointError: it cannot
    be checked, which is not damage)."""
    for name in names:
        path, expected = directory / name, files[name]
        if not path.is_file():
            raise CheckpointDamaged(f"{directory.name}/{name} is missing")
        if path.stat().st_size != expected["size"]:
            raise CheckpointDamaged(f"{directory.name}/{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}")
        if ALGORITHM not in expected:
            raise CheckpointError(f"{directory.name}/{MANIFEST} has no {ALGORITHM} checksum for {name} (written by an older ebb)")
        if file_checksum(path) != expected[ALGORITHM]:
            raise CheckpointDamaged(f"{directory.name}/{name} does not match its checksum in the manifest")
