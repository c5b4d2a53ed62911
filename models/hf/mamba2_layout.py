"""Mamba2's in_proj and conv1d between our group-major layout and transformers'.

Ours ([z_g | x_g | B_g | C_g | dt_g] per group g, conv channels [x_g | B_g | C_g]; see
`models.mixers.mamba2`) and transformers' ([z | x | B | C | dt], conv [x | B | C], each part
holding every group) are the same for n_groups = 1. Other parameters are the same in both.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from models.layers.fused import group_widths, split_groups


def _widths_by_name(d_inner: int, d_state: int, n_groups: int, n_heads: int) -> dict[str, list[int]]:
    """The per-group part widths along dim 0 of each reordered parameter."""
    widths = group_widths(d_inner, d_state, n_groups, n_heads)
    return {"in_proj.weight": widths.in_proj(), "conv1d.weight": widths.conv(), "conv1d.bias": widths.conv()}


def _part_major(t: Tensor, widths: list[int]) -> Tensor:
    """[p0_g | p1_g | ...] for each group g -> [p0 of every group | p1 of every group | ...]."""
    return torch.cat(split_groups(t, widths, dim=0))


def _group_major(t: Tensor, widths: list[int]) -> Tensor:
    """The inverse of `_part_major`."""
    n_groups = t.shape[0] // sum(widths)
    parts = t.split([n_groups * width for width in widths])
    return torch.cat([part.unflatten(0, (n_groups, -1)) for part in parts], dim=1).flatten(0, 1)


def _reordered(state: dict[str, Tensor], widths: dict[str, list[int]],
               reorder: Callable[[Tensor, list[int]], Tensor]) -> dict[str, Tensor]:
    """`state` with the parameters named in `widths` (matched by key suffix) reordered on dim 0."""
    out = dict(state)
    for key, t in state.items():
        for name, part_widths in widths.items():
            if key == name or key.endswith("." + name):
                out[key] = reorder(t, part_widths)
    return out


def to_transformers_layout(state: dict[str, Tensor], d_inner: int, d_state: int, n_groups: int,
                           n_heads: int) -> dict[str, Tensor]:
    """A Mamba2 mixer's state dict (keys may carry a prefix, e.g. `blocks.0.mixer.`) in
    transformers' layout."""
    return _reordered(state, _widths_by_name(d_inner, d_state, n_groups, n_heads), _part_major)


def from_transformers_layout(state: dict[str, Tensor], d_inner: int, d_state: int, n_groups: int,
                             n_heads: int) -> dict[str, Tensor]:
    """The inverse of `to_transformers_layout`."""
    return _reordered(state, _widths_by_name(d_inner, d_state, n_groups, n_heads), _group_major)
