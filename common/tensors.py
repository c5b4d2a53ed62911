"""Tensor helpers every package shares."""
from __future__ import annotations

from torch import Tensor
from torch.distributed.tensor import DTensor


def local_shard(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: writing to it writes the DTensor); plain tensors as they are."""
    return t.to_local() if isinstance(t, DTensor) else t
