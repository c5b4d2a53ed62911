"""The ranks that save a checkpoint together, over a gloo group of their own.

Checkpoint collectives never share a group with training: a lazy or async save runs them from a
background thread while the training thread runs its own collectives, and a gloo group serves CPU
objects whichever backend trains. Without a process group every call is local.
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist

from checkpoint import CheckpointError
from common.processes import new_gloo_group


class Ranks:
    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.size = dist.get_world_size(group) if group is not None else 1

    @classmethod
    def new_group(cls) -> "Ranks":
        """A fresh gloo group over every rank, with the run's collective timeout (collective: every
        rank creates it, in the same order)."""
        return cls(new_gloo_group() if dist.is_available() and dist.is_initialized() else None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, on every rank."""
        if self.group is None:
            return [obj]
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def agree(self, error: str | None) -> None:
        """Raise on every rank the first rank's error, if any rank had one (None for none)."""
        errors = [e for e in self.gather(error) if e is not None]
        if errors:
            raise CheckpointError(errors[0])

    def all(self, flag: bool) -> bool:
        return all(self.gather(flag))
