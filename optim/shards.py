"""Optimizer states of DTensor parameters (FSDP2, TP) are DTensors laid out like the parameter.

Each rank quantises its local shard; codes have the parameter's shape and placements, per-block
scales the shape `shape[:-1] + (blocks,)` with the same placements. DCP then saves every part by
its global index and reshards it on load. Blocks run along the last dim, so sharding another dim
never cuts one; a parameter sharded along its last dim keeps whole blocks only when every shard
is a whole number of blocks (`blocks_survive_sharding`), and one that is not keeps fp32 states.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from optim.codecs.base import scale_shape


def shards_along_last_dim(param: Tensor) -> int:
    if not isinstance(param, DTensor) or param.ndim == 0:
        return 1
    count = 1
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard) and placement.dim % param.ndim == param.ndim - 1:
            count *= param.device_mesh.size(mesh_dim)
    return count


def blocks_survive_sharding(param: Tensor, block: int) -> bool:
    """Every shard of `param`'s last dim is a whole number of blocks (always true unsharded)."""
    shards = shards_along_last_dim(param)
    return shards == 1 or param.shape[-1] % (block * shards) == 0


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def like_param(part: Tensor, param: Tensor, block: int | None = None) -> Tensor:
    """`part` (a state tensor of `param`'s local shard: the shard's shape, or per-block scales)
    as a DTensor placed like `param`; `part` itself when `param` is a plain tensor."""
    if not isinstance(param, DTensor):
        return part
    shape = param.shape if part.shape == param.to_local().shape else scale_shape(param.shape, block)
    return DTensor.from_local(part, param.device_mesh, param.placements, run_check=False, shape=shape, stride=_contiguous_stride(shape))
