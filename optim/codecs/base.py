"""What a state codec is, and the block layout the quantising codecs share.

A codec stores one Adam moment of one tensor as a few named parts: the codes, shaped like the
tensor, and for block codecs per-block parts (scales) of shape `shape[:-1] + (blocks,)`. Blocks
run along the last dimension of the global tensor: per row, global columns [j*block, (j+1)*block)
(a 1-D tensor is one row; the last block of a row may be short). Where a rank holds whole blocks,
its parts are a shard of the global parts; where a shard boundary falls inside a block, the
ranks that share it agree on its statistics first (`optim/shards.py`), so every layout stores
what one process would.

A block codec encodes in two steps: the `statistics` of each block (each reduces over pieces of
a block as its `Reduction` says: the max of the maxima, the min of the minima), then the codes
and scales those statistics give (`encode_with`). `encode` is the two together. The math is pure
tensor code on any shape, with lookup tables passed in (`tables`), so that the optimizer can run
it eagerly or inside one `torch.compile`d step over many tensors at once: it lays the tensors of
a group out as rows of whole blocks, `[blocks, block]` (each tensor's rows padded to whole blocks
with the code of zero), and a `[blocks, block]` array is just another tensor to `decode` and
`encode` (`optim/buckets.py`).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Parts = dict[str, Tensor]
Stats = dict[str, Tensor]  # per-block statistics by name, each shaped like a per-block part
Reduction = Literal["max", "min"]


class StateCodec(ABC):
    """Encodes and decodes one moment. `signed` is True for the first moment, False for the
    second (never negative). Parts are named by `suffixes`, appended to the moment's state key:
    e.g. int8 stores `exp_avg_int8` (codes) and `exp_avg_int8_absmax`; fp32 stores `exp_avg`
    itself, torch AdamW's name. Distinct names per codec make a checkpoint saved with one
    state dtype fail to load under another with a missing-key error rather than a silent cast."""

    name: str
    suffixes: tuple[str, ...]
    block: int | None = None  # elements per block along the last dim; None = no blocks (elementwise)

    @property
    def block_parts(self) -> tuple[str, ...]:
        """The suffixes of the per-block parts (block codecs: every part but the codes, the first)."""
        return self.suffixes[1:] if self.block else ()

    @abstractmethod
    def zeros(self, local: Tensor, blocks: torch.Size | None = None) -> Parts:
        """The parts holding an all-zero moment for a tensor like `local`; per-block parts are
        shaped `blocks` (default `scale_shape(local.shape, block)`)."""

    def tables(self, device: torch.device) -> Parts:
        """Constant tensors the math reads (e.g. int8's maps), one copy per device; passed to
        `decode` and `encode` as inputs, so that a compiled step reads them rather than rebuilding
        them. None by default."""
        return {}

    @abstractmethod
    def decode(self, parts: Parts, signed: bool, tables: Parts | None = None) -> Tensor:
        """The moment in float32 (may alias the codes when they are float32). `tables`: this
        codec's `tables` on the parts' device (looked up when None)."""

    @abstractmethod
    def encode(self, value: Tensor, signed: bool, tables: Parts | None = None) -> Parts:
        """The parts holding the float32 `value` (new tensors, or `value` itself for fp32)."""

    def encode_(self, value: Tensor, parts: Parts, signed: bool) -> None:
        """Store the float32 `value` into `parts`, in place."""
        for suffix, new in self.encode(value, signed).items():
            parts[suffix].copy_(new)  # a no-op when `new` is the part itself (fp32)

    def fused_update_(
        self, target: Tensor, grad: Tensor, m: Parts, v: Parts, step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
    ) -> bool:
        """The whole AdamW step on `target` and both moments' parts, in place, by a fused kernel
        of this codec's own where one applies to `target`; False, having done nothing, where
        none does (then the optimizer decodes, steps in fp32 and encodes)."""
        return False


class BlockCodec(StateCodec):
    """A codec that quantises in blocks of `block` along the last dim: the first suffix names
    the uint8 codes, the others per-block parts that `scales` computes from the block's
    `statistics` alone."""

    block: int
    statistics: dict[str, Reduction]  # each statistic's name and how pieces of one block combine

    @abstractmethod
    def block_statistics(self, blocks: Tensor) -> Stats:
        """Each statistic of each block of `blocks` `[..., blocks, block]` (padding holds zeros,
        which no statistic may count): tensors `[..., blocks]`."""

    @abstractmethod
    def scales(self, stats: Stats) -> Parts:
        """The per-block parts of blocks with these statistics."""

    @abstractmethod
    def codes(self, blocks: Tensor, scales: Parts, signed: bool, tables: Parts | None = None) -> Tensor:
        """The uint8 codes of `blocks` `[..., blocks, block]` under their per-block parts `scales`."""

    def encode(self, value: Tensor, signed: bool, tables: Parts | None = None) -> Parts:
        blocks = to_blocks(value, self.block)
        return self._encoded(blocks, self.block_statistics(blocks), value.shape, signed, tables)

    def encode_with(self, value: Tensor, stats: Stats, signed: bool, tables: Parts | None = None) -> Parts:
        """The parts of `value` under the given per-block statistics (those of `value`'s own blocks,
        or of the whole blocks its blocks are pieces of)."""
        return self._encoded(to_blocks(value, self.block), stats, value.shape, signed, tables)

    def _encoded(self, blocks: Tensor, stats: Stats, shape: torch.Size, signed: bool, tables: Parts | None) -> Parts:
        scales = self.scales(stats)
        return {self.suffixes[0]: from_blocks(self.codes(blocks, scales, signed, tables), shape), **scales}


IDENTITY: dict[Reduction, float] = {"max": -math.inf, "min": math.inf}  # what a block piece that holds nothing contributes


def num_blocks(last_dim: int, block: int) -> int:
    return math.ceil(last_dim / block)


def scale_shape(shape: torch.Size, block: int) -> torch.Size:
    """Shape of a per-block part of a tensor of `shape` (a 0-d tensor is one row of one)."""
    rows = tuple(shape[:-1]) if len(shape) else ()
    return torch.Size(rows + (num_blocks(shape[-1] if len(shape) else 1, block),))


def to_blocks(x: Tensor, block: int) -> Tensor:
    """`x` as float32 `[*rows, blocks, block]`, each row zero-padded to whole blocks."""
    x = x.float().reshape(scale_shape(x.shape, block)[:-1] + (-1,))
    pad = (-x.shape[-1]) % block
    return (F.pad(x, (0, pad)) if pad else x).unflatten(-1, (-1, block))  # a view when rows are whole blocks


def from_blocks(blocks: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of `to_blocks`: drop the padding, restore `shape`."""
    last = shape[-1] if len(shape) else 1
    return blocks.flatten(-2)[..., :last].reshape(shape)
