"""Checks before a run builds anything: its directories are directories it can write, the
checkpoint directory has room for one checkpoint, and no other run owns the run directory.

Each would otherwise surface at the first save, which can be the end of training. Rank 0 checks
(the directories are shared); every rank learns the outcome, so all stop with the same line.

Ownership is an exclusive `flock` on `<dir>/.lock`, held until the process ends: the kernel
releases it when the owner exits or is killed, so no lock is ever left stale, and the file only
says who holds it (pid, host, start time) for the message a second run prints.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch.distributed as dist

from pretrain.config import RunConfig
from pretrain.errors import RunError
from pretrain.estimate import checkpoint_bytes, meta_model

LOCK_FILE = ".lock"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_directory(path: Path, key: str, how: str) -> None:
    """`path` is, or can become, a directory this process writes into. `how`: "create" it and
    write a temporary file into it; "probe" with a temporary file where it is, or its nearest
    existing ancestor, creating nothing; "look" only (`os.access`, which sees read-only file
    systems too)."""
    existing = nearest_existing(path)
    if existing == path and not path.is_dir():
        raise RunError(f"{key} {path} is a file, not a directory")
    if not existing.is_dir():
        raise RunError(f"{key} {path} cannot be created: {existing} is a file")
    if how == "look":
        if not os.access(existing, os.W_OK | os.X_OK):
            raise RunError(f"{key} {path} is not writable ({existing} is read-only to this process)")
        return
    try:
        if how == "create":
            path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path if how == "create" else existing):
            pass
    except OSError as exc:
        raise RunError(f"{key} {path} is not writable: {exc.strerror or exc}") from None


def checkpoint_root(cfg: RunConfig) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.train.run_dir) / "checkpoints"


def saves_checkpoints(cfg: RunConfig) -> bool:
    return bool(cfg.checkpoint.interval) or cfg.checkpoint.save_final


def check_free_space(root: Path, cfg: RunConfig) -> None:
    """Room for one more checkpoint (weights and optimizer state, counted from the shapes)."""
    need = checkpoint_bytes(meta_model(cfg.model), cfg.optim)
    free = shutil.disk_usage(nearest_existing(root)).free
    if free < need:
        raise RunError(
            f"checkpoint dir {root} has {human_bytes(free)} free, and one checkpoint of this model needs about {human_bytes(need)}; "
            "free some space or set checkpoint.dir"
        )


def check_directories(cfg: RunConfig, look_only: bool = False) -> None:
    """The run directory (created) and the checkpoint directory (probed; the first save creates
    it), see `check_directory`, and room for a checkpoint; `look_only` writes nothing."""
    check_directory(Path(cfg.train.run_dir), "train.run_dir", "look" if look_only else "create")
    if saves_checkpoints(cfg) or cfg.checkpoint.dir:
        root = checkpoint_root(cfg)
        check_directory(root, "checkpoint.dir" if cfg.checkpoint.dir else "the checkpoint dir", "look" if look_only else "probe")
        if saves_checkpoints(cfg):
            check_free_space(root, cfg)


class DirectoryLock:
    """An exclusive lock on a directory for this process's lifetime (see the module docstring)."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK_FILE
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RunError(f"{directory} is in use by another run ({holder}); wait for it to end, or use another train.run_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()  # closing the last descriptor releases the flock


def lock_directories(cfg: RunConfig) -> list[DirectoryLock]:
    """Locks on the run directory and, when it lies elsewhere, the checkpoint directory."""
    run_dir, root = Path(cfg.train.run_dir).resolve(), checkpoint_root(cfg).resolve()
    locks = [DirectoryLock(run_dir)]
    if saves_checkpoints(cfg) and not root.is_relative_to(run_dir):
        try:
            root.mkdir(parents=True, exist_ok=True)
            locks.append(DirectoryLock(root))
        except (RunError, OSError) as exc:
            locks[0].release()
            raise RunError(str(exc) if isinstance(exc, RunError) else f"checkpoint.dir {root}: {exc.strerror or exc}") from None
    return locks


def claim_run(cfg: RunConfig, is_main: bool, group: dist.ProcessGroup | None) -> list[DirectoryLock]:
    """On rank 0: check the directories and lock them. Every rank of `group` raises the same
    RunError if that failed; rank 0 returns its locks (release them when the run ends)."""
    error, locks = None, []
    if is_main:
        try:
            check_directories(cfg)
            locks = lock_directories(cfg)
        except RunError as exc:
            error = str(exc)
    if group is not None:
        errors = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, error, group=group)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        for lock in locks:
            lock.release()
        raise RunError(error)
    return locks
