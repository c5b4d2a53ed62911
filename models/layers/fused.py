"""Fused projections whose output rows are stored group- or head-major ([part_0 | part_1 | ...]
for each group), so that a slice of whole groups is the same layer with fewer groups: what a
tensor-parallel rank holds."""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


def split_groups(t: Tensor, widths: Sequence[int], dim: int = -1) -> list[Tensor]:
    """Split a group-major `dim` ([part_0 | part_1 | ...] for each group, parts `widths` wide)
    into one tensor per part holding that part of every group in group order."""
    dim = dim % t.dim()
    groups = t.unflatten(dim, (-1, sum(widths)))
    return [part.flatten(dim, dim + 1) for part in groups.split(list(widths), dim=dim + 1)]


@torch.no_grad()
def store_head_major_(param: Tensor, widths: Sequence[int], heads: int) -> None:
    """Reorder dim 0 of a freshly initialised fused `param` from part-major ([part_0 of every
    head | part_1 of every head | ...], `widths` rows each) to head-major ([part_0 | part_1 | ...]
    for each head). Drawn part by part first: the values a seed gives are kept."""
    parts = [part.unflatten(0, (heads, -1)) for part in param.split(list(widths))]
    param.copy_(torch.cat(parts, dim=1).flatten(0, 1))


class GroupWidths(NamedTuple):
    """Widths of one group's slice of Mamba2's in_proj output."""

    inner: int  # z_g and x_g: heads_per_group * head_dim
    state: int  # B_g and C_g: d_state
    heads: int  # dt_g: heads_per_group

    def in_proj(self) -> list[int]:
        """[z_g | x_g | B_g | C_g | dt_g]"""
        return [self.inner, self.inner, self.state, self.state, self.heads]

    def conv(self) -> list[int]:
        """[x_g | B_g | C_g]"""
        return [self.inner, self.state, self.state]


def group_widths(d_inner: int, d_state: int, n_groups: int, n_heads: int) -> GroupWidths:
    return GroupWidths(d_inner // n_groups, d_state, n_heads // n_groups)
