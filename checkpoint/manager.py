"""Checkpoint directories: `<root>/step-00000100/`, the commit protocol, `latest`, keep-last-k, resume.

Commit (every mode): a checkpoint is written into `<root>/.tmp-step-.../`; once every rank has
written its files, each rank fsyncs and checksums its own, rank 0 gathers the sizes and checksums
into `manifest.json`, fsyncs it, renames the directory to `step-...` (atomic on one filesystem),
fsyncs the root, and only then rewrites `latest` and deletes checkpoints beyond `keep_last`. A
crash at any moment therefore leaves every `step-*` directory complete, and the newest committed
one is the highest `step-*`, whatever `latest` says.

Resume takes the newest committed checkpoint whose files match its manifest (the ranks verify a
share of the files each). A damaged one is moved aside into `<root>/quarantine/` (kept, not
deleted: its bytes may still be worth something), so that the run can go on and commit that step
again; an intact one that does not load into the run's model and optimizer is a mismatch between
configs, not damage, and stops the resume with nothing moved. A checkpoint saved under another
layout (the manifest's: mesh dims and optimizer offload) is resharded as it loads, and rank 0
says so in one line first.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from checkpoint import CheckpointDamaged, CheckpointError, CheckpointMismatch, dcp
from checkpoint.manifest import MANIFEST, describe, read_manifest, verify, write_manifest
from checkpoint.ranks import Ranks
from checkpoint.storage import fsync_path

LATEST = "latest"
LAYOUT_FLAGS = ("world_size", "offload")  # a layout's entries that are not mesh dims
QUARANTINE = "quarantine"  # under the checkpoint root: damaged checkpoints that resume moved aside
STEP_DIR = re.compile(r"step-(\d+)")
RANK_SHARD = re.compile(r"__(\d+)_\d+\.distcp")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def staging_dir(root: Path, step: int) -> Path:
    return root / f".tmp-{step_dir_name(step)}"


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


def intact_checkpoint(path: Path) -> Path:
    """What `resolve_checkpoint` finds, verified against its manifest in this process. Named
    outright, a damaged checkpoint is an error; found under a run or checkpoint directory, the
    newest intact one is taken, with a warning for each damaged one passed over (nothing is moved:
    readers leave the run directory as it is)."""
    if (path / dcp.DCP_METADATA).is_file() or (path / MANIFEST).is_file():
        verify_together(Ranks(None), path)
        return path
    root = next((r for r in (path, path / "checkpoints") if committed_checkpoints(r)), None)
    if root is None:
        resolve_checkpoint(path)  # raises its error
    for candidate in committed_checkpoints(root)[::-1]:
        try:
            verify_together(Ranks(None), candidate)
            return candidate
        except CheckpointDamaged as exc:
            print(f"ebb: warning: checkpoint {candidate} is damaged ({exc}); taking the one before", file=sys.stderr, flush=True)
    raise CheckpointError(f"no intact checkpoint in {root}: every one is damaged")


def prepare(ranks: Ranks, root: Path, step: int) -> Path:
    """A fresh, empty staging directory for `step` (rank 0 creates it; every rank returns once it exists)."""
    staging, final = staging_dir(root, step), root / step_dir_name(step)
    error = None
    if final.exists():
        error = f"checkpoint {final} already exists; resume from it or use another checkpoint.dir"
    elif ranks.is_main:
        try:
            for stale in root.glob(".tmp-step-*"):  # left by saves that crashed (one save runs at a time)
                shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir(parents=True)
        except OSError as exc:
            error = f"cannot create {staging}: {exc.strerror or exc}"
    ranks.agree(error)
    return staging


def own_files(staging: Path, ranks: Ranks) -> list[str]:
    """The files this rank wrote: its DCP shards, and on rank 0 everything else too."""
    names = []
    for path in staging.iterdir():
        shard = RANK_SHARD.fullmatch(path.name)
        if (shard and int(shard.group(1)) == ranks.rank) or (shard is None and ranks.is_main):
            names.append(path.name)
    return names


def commit(ranks: Ranks, root: Path, step: int, layout: dict[str, Any], keep_last: int, checksums: dict[str, str]) -> Path:
    """Commit the staging directory every rank has finished writing into (see the module
    docstring); `checksums`: those this rank's writer took of its files."""
    staging, final = staging_dir(root, step), root / step_dir_name(step)
    error, files = None, {}
    try:
        files = describe(staging, own_files(staging, ranks), checksums)
    except OSError as exc:
        error = f"cannot sync {staging}: {exc.strerror or exc}"
    gathered = ranks.gather((error, files))
    error = next((e for e, _ in gathered if e is not None), None)
    if ranks.is_main and error is None:
        try:
            publish(root, staging, final, {"step": step, "layout": layout, "files": {k: v for _, f in gathered for k, v in f.items()}})
            prune(root, keep_last)
        except OSError as exc:
            error = f"cannot commit {final}: {exc.strerror or exc}"
    ranks.agree(error)
    return final


def publish(root: Path, staging: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Manifest, atomic rename, then `latest`: each made durable before the next."""
    write_manifest(staging, manifest["step"], manifest["layout"], manifest["files"])
    os.rename(staging, final)
    fsync_path(root)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    fsync_path(pointer)
    os.replace(pointer, root / LATEST)
    fsync_path(root)


def prune(root: Path, keep_last: int) -> None:
    for old in committed_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)  # a failed prune must not fail the commit before it


def discard(ranks: Ranks, root: Path, step: int) -> None:
    """Remove a failed save's staging directory (committed checkpoints are never touched)."""
    if ranks.is_main:
        shutil.rmtree(staging_dir(root, step), ignore_errors=True)


def verify_together(ranks: Ranks, path: Path) -> None:
    """Check `path` against its manifest, each rank a share of the files; raises on every rank
    (CheckpointDamaged when any rank found damage). The one verification that resume,
    generation and conversion share."""
    found: tuple[bool, str] | None = None
    try:
        files = read_manifest(path)["files"]
        verify(path, sorted(files)[ranks.rank :: ranks.size], files)
    except CheckpointError as exc:
        found = (isinstance(exc, CheckpointDamaged), str(exc))
    problems = [p for p in ranks.gather(found) if p is not None]
    if problems:
        damaged, message = problems[0]
        raise (CheckpointDamaged if damaged else CheckpointError)(message)


def set_aside(ranks: Ranks, root: Path, path: Path) -> Path:
    """Move the damaged checkpoint `path` into `<root>/quarantine/` (rank 0; every rank returns
    its new place). A name already there gets a numbered suffix: nothing is overwritten."""
    target, error = root / QUARANTINE / path.name, None
    if ranks.is_main:
        try:
            target.parent.mkdir(exist_ok=True)
            n = 1
            while target.exists():
                target, n = root / QUARANTINE / f"{path.name}.{n}", n + 1
            os.rename(path, target)
            fsync_path(root)
        except OSError as exc:
            error = f"checkpoint {path} is damaged and cannot be moved aside into {target.parent}: {exc.strerror or exc}"
    target = ranks.gather(target)[0]
    ranks.agree(error)
    return target


def load_intact(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: dcp.Stateful, data: dcp.Stateful) -> int:
    """`dcp.load` of a verified checkpoint; a failure there is a mismatch with this run's model or
    optimizer (the files are what was saved)."""
    try:
        return dcp.load(path, model, optimizer, schedule, data)
    except CheckpointError as exc:
        raise CheckpointMismatch(f"checkpoint {path} is intact but does not fit this run's model and optimizer: {exc}", path) from None


def describe_layout(layout: dict[str, Any]) -> str:
    """`tp=2 x dp_shard=4`, `one process`; `with optimizer offload` where it is on."""
    dims = " x ".join(f"{dim}={size}" for dim, size in layout.items() if dim not in LAYOUT_FLAGS and isinstance(size, int) and size > 1)
    return (dims or "one process") + (" with optimizer offload" if layout.get("offload") else "")


def layout_change(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """`from <saved> to <current>` where the layouts differ; None where they agree, or where
    either is unknown (an empty layout: a checkpoint or a caller that records none)."""
    if not saved or not current or describe_layout(saved) == describe_layout(current):
        return None
    return f"from {describe_layout(saved)} to {describe_layout(current)}"


def resume(
    ranks: Ranks, root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: dcp.Stateful, data: dcp.Stateful,
    layout: dict[str, Any] | None = None,
) -> tuple[int, Path]:
    """Load the newest intact committed checkpoint, moving damaged newer ones aside (see the
    module docstring); its step and path. `layout`: this run's, as commits record it: where the
    checkpoint's differs, rank 0 says `ebb: resharding step-... from ... to ...` before loading."""
    candidates = committed_checkpoints(root)[::-1]
    if not candidates:
        raise CheckpointError(f"nothing to resume: no checkpoint in {root}")
    problems = []
    for path in candidates:
        try:
            verify_together(ranks, path)
        except CheckpointDamaged as exc:
            moved = set_aside(ranks, root, path)
            problems.append(str(exc))
            _say(ranks, f"ebb: warning: checkpoint {path} is damaged ({exc}); moved it to {moved}")
            continue
        if ranks.is_main and (change := layout_change(read_manifest(path).get("layout") or {}, layout or {})):
            print(f"ebb: resharding {path.name} {change}", flush=True)
        step = load_intact(path, model, optimizer, schedule, data)
        if problems:
            _say(ranks, f"ebb: resuming from {path}, the newest intact checkpoint")
        return step, path
    raise CheckpointError(f"nothing to resume: every checkpoint in {root} is damaged ({'; '.join(problems)}); they are now in {root / QUARANTINE}")


def _say(ranks: Ranks, line: str) -> None:
    if ranks.is_main:
        print(line, file=sys.stderr, flush=True)
