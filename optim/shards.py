"""Optimizer states of DTensor parameters (FSDP2, TP), and the blocks that ranks share.

A state is a DTensor laid out like the global state of one process, so that DCP saves every part
by its global index and reshards it on load, whatever the layouts. Elementwise parts (fp32 and
bf16 moments, codes, master copies) are placed like the parameter. A block codec's per-block
parts have the global shape `rows x blocks` (blocks along the global last dim, `BlockGrid`):

- where every shard of the last dim holds whole global blocks (FSDP2 sharding dim 0, TP's
  column split, a row split into multiples of the block), each rank keeps the parts of its own
  blocks: a shard of the global parts, placed like the parameter;
- where a shard boundary falls inside a block (`BlockGrid.shared`: a row split that is not
  whole blocks, FSDP2 sharding a 1-D tensor, uneven or empty shards), each rank keeps the parts
  of every block of its rows, replicated over the ranks that split the last dim, and those
  ranks combine each block's statistics before encoding (`exchange`), so that the block is
  encoded as one process would encode it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset, compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from optim.codecs.base import Reduction, Stats, num_blocks, scale_shape


class LayoutError(ValueError):
    """A parameter sharded so that its local shards are not contiguous ranges of its last dim."""


@dataclass(frozen=True)
class SplitGroup:
    """The process group of a mesh dim that splits a tensor's last dim, and that dim's name."""

    dim: str
    group: dist.ProcessGroup

    @property
    def order(self) -> tuple[str, tuple[int, ...]]:
        """Where its reduction comes in `exchange`: by mesh dim, then by ranks. Every rank
        reduces over the groups of one mesh dim before the next dim's, so a block split over two
        dims is reduced over one, then over the other, on every rank that holds a piece of it."""
        return self.dim, tuple(dist.get_process_group_ranks(self.group))


@dataclass(frozen=True)
class BlockGrid:
    """Where this rank's shard of a tensor sits on the tensor's global grid of blocks (`block`
    elements along the last dim): each local row holds `width` elements from global column
    `offset`, out of `total` blocks per row. `shared`: some block of the tensor is split between
    ranks; `groups`: those of the mesh dims that split the last dim; `placements`: the per-block parts' (None for a plain tensor)."""

    block: int
    width: int
    offset: int
    total: int
    shared: bool = False
    groups: tuple[SplitGroup, ...] = ()
    placements: tuple[Placement, ...] | None = None

    @property
    def lead(self) -> int:
        """Elements of the first local block that belong to the ranks before this one."""
        return self.offset % self.block

    @property
    def first(self) -> int:
        """The global index of the first block this shard touches."""
        return self.offset // self.block

    @property
    def count(self) -> int:
        """Blocks this shard touches per row."""
        return num_blocks(self.lead + self.width, self.block) if self.width else 0

    def parts_shape(self, local: torch.Size) -> torch.Size:
        """The local shape of a per-block part of a shard shaped `local`: its own blocks, or
        every block of its rows where blocks are shared."""
        if not self.shared:
            return scale_shape(local, self.block)
        return torch.Size(tuple(local[:-1]) + (self.total,))


def _last_dim_shards(param: DTensor) -> list[int]:
    """The mesh dims whose placement splits `param`'s last dim."""
    last = param.ndim - 1
    return [i for i, p in enumerate(param.placements) if isinstance(p, (Shard, _StridedShard)) and p.dim % param.ndim == last]


def _last_dim_range(shape: torch.Size, mesh_shape: tuple[int, ...], coordinate: list[int], placements: tuple[Placement, ...]) -> tuple[int, int]:
    """(offset, width) along the last dim of the shard at `coordinate`, by torch's own arithmetic."""
    local, offset = _compute_local_shape_and_global_offset(shape, mesh_shape, coordinate, placements)
    return offset[-1], local[-1]


def block_grid(param: Tensor, block: int) -> BlockGrid:
    """`param`'s `BlockGrid` on this rank, computed from its global shape and placements alone,
    so every rank that holds a piece of a block reaches the same `shared` verdict."""
    last = param.shape[-1] if param.ndim else 1
    total = num_blocks(last, block)
    if not isinstance(param, DTensor):
        return BlockGrid(block, last, 0, total)
    mesh, placements = param.device_mesh, tuple(param.placements)
    if param.ndim == 0 or not (dims := _last_dim_shards(param)):
        return BlockGrid(block, last, 0, total, placements=placements)
    local, offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
    parts_global = scale_shape(param.shape, block)
    ranges, whole = set(), True
    for coordinate in itertools.product(*(range(n) for n in mesh.shape)):
        start, width = _last_dim_range(param.shape, mesh.shape, list(coordinate), placements)
        if width:
            ranges.add((start, width))
            blocks_at, blocks = _last_dim_range(parts_global, mesh.shape, list(coordinate), placements)
            own = BlockGrid(block, width, start, total)
            # whole blocks, and the parts placed like the parameter hold exactly those blocks
            whole &= own.lead == 0 and ((start + width) % block == 0 or start + width == last) and (blocks_at, blocks) == (own.first, own.count)
    _check_contiguous(param, sorted(ranges), last)
    if whole:
        return BlockGrid(block, local[-1], offset[-1], total, placements=placements)
    names = mesh.mesh_dim_names or tuple(f"dim {i}" for i in range(mesh.ndim))
    groups = tuple(SplitGroup(names[i], mesh.get_group(i)) for i in dims)
    per_block = tuple(Replicate() if i in dims else p for i, p in enumerate(placements))
    return BlockGrid(block, local[-1], offset[-1], total, True, groups, per_block)


def _check_contiguous(param: DTensor, ranges: list[tuple[int, int]], last: int) -> None:
    """The non-empty shards of the last dim tile it: contiguous, in order, without overlap."""
    end = 0
    for start, width in ranges:
        if start != end:
            raise LayoutError(f"a parameter of shape {tuple(param.shape)} placed {param.placements}: its shards are not contiguous ranges of its last dim")
        end = start + width
    if end != last:
        raise LayoutError(f"a parameter of shape {tuple(param.shape)} placed {param.placements}: its shards do not cover its last dim")


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def like_param(part: Tensor, param: Tensor) -> Tensor:
    """`part` (an elementwise state tensor of `param`'s local shard, shaped like it) as a DTensor
    placed like `param`; `part` itself when `param` is a plain tensor."""
    if not isinstance(param, DTensor):
        return part
    return DTensor.from_local(part, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride())


def blocks_like_param(part: Tensor, param: Tensor, grid: BlockGrid) -> Tensor:
    """`part` (a per-block state tensor of `param`'s local shard, `grid.parts_shape`) as a
    DTensor of the global per-block shape, placed as `grid` says; `part` itself when `param` is
    a plain tensor."""
    if not isinstance(param, DTensor):
        return part
    shape = scale_shape(param.shape, grid.block)
    return DTensor.from_local(part, param.device_mesh, grid.placements, run_check=False, shape=shape, stride=_contiguous_stride(shape))


def exchange(statistics: list[tuple[BlockGrid, Stats, dict[str, Reduction]]]) -> None:
    """Combine, in place, each shared block's statistics over the ranks that hold a piece of it:
    `statistics` holds, per tensor whose blocks are shared, its grid, its per-block statistics
    over the whole width of its local rows (pieces a rank does not hold at `IDENTITY`) and how
    each reduces. One all-reduce (MAX; a minimum is the maximum of the negatives) per process
    group, in `SplitGroup.order`. Every rank of a group calls it with the same tensors, in the
    same order."""
    groups = {split.order: split.group for grid, _, _ in statistics for split in grid.groups}
    for order in sorted(groups):
        pieces = [
            (tensor, reductions[name]) for grid, stats, reductions in statistics if any(split.order == order for split in grid.groups)
            for name, tensor in stats.items()
        ]
        flat = torch.cat([(t if how == "max" else -t).reshape(-1) for t, how in pieces])
        dist.all_reduce(flat, dist.ReduceOp.MAX, group=groups[order])
        for (tensor, how), chunk in zip(pieces, flat.split([t.numel() for t, _ in pieces])):
            tensor.copy_((chunk if how == "max" else -chunk).view(tensor.shape))
