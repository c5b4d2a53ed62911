"""Mamba2 (SSD) mixer, docs/layers.md section 1.

Parameter names are those of transformers' `Mamba2Mixer` (and mamba_ssm). The in_proj rows are
stored group-major, [z_g | x_g | B_g | C_g | dt_g] for each group g, and the conv channels
[x_g | B_g | C_g]: a contiguous slice of whole groups is then a Mamba2 with fewer groups, which is
what a tensor-parallel rank holds, at every tp. With n_groups = 1 this is transformers' layout
[z | x | B | C | dt]; otherwise `models.hf.mamba2_layout` converts. The SSD recurrence is
`chunk_simple_gla` with q = C, k = B, v = x * dt, g = A * dt and no scale.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from common.config import OpenBound
from models.layers.conv import ShortConv, conv_features
from models.layers.flops import chunked_recurrence_flops, projection_flops
from models.layers.init import init_decay_, no_weight_decay, residual_scale
from models.packing import as_one_sequence
from models.layers.recurrence import cached_recurrence
from models.layers.fused import split_groups
from models.layers.norms import GatedRMSNorm
from models.spec import Mixer, MixerConfig, MixerSpec, TensorParallelPlan
from models.ops import chunk_simple_gla

if TYPE_CHECKING:
    from models.config import ModelConfig


class GroupWidths(NamedTuple):
    """Widths of one group's slice of the in_proj output."""

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


class Mamba2Config(MixerConfig):
    d_state: int = Field(128, gt=0)
    d_conv: int = Field(4, gt=0)
    expand: int = Field(2, gt=0)
    head_dim: int = Field(64, gt=0)
    n_groups: int = Field(1, gt=0)
    chunk_size: int = Field(256, gt=0)
    A_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = Field(1e-3, gt=0)
    dt_max: float = Field(0.1, gt=0)
    dt_init_floor: float = Field(1e-4, gt=0)
    dt_limit: tuple[float, OpenBound] = (0.0, float("inf"))
    conv_bias: bool = True
    norm_eps: float = Field(1e-5, gt=0)

    def check_shapes(self, model: ModelConfig) -> None:
        d_inner = self.expand * model.d_model
        if d_inner % self.head_dim:
            raise ValueError(f"expand*d_model ({d_inner}) must be divisible by mixers.mamba2.head_dim ({self.head_dim})")
        if (d_inner // self.head_dim) % self.n_groups:
            raise ValueError(f"mamba2 heads ({d_inner // self.head_dim}) must be divisible by mixers.mamba2.n_groups ({self.n_groups})")

    def tp_divides(self, model: ModelConfig) -> dict[str, int]:
        """Ranks hold whole groups of B and C with the heads that read them (Megatron-LM's rule):
        n_groups = 1 cannot be split."""
        return {"mixers.mamba2.n_groups": self.n_groups}


class Mamba2(Mixer):
    """Under tensor parallelism rank r holds n_groups/tp whole groups: with the group-major rows,
    plain colwise and dim-0 splits give each rank the layout of a Mamba2 with fewer groups, so
    the SSD recurrence, D and the grouped gated norm are all local, and the global row order
    (checkpoints, optimizer states) is the same at every tp."""

    tp_plan = TensorParallelPlan(
        colwise=("in_proj",),
        sharded={"conv1d": ("weight", "bias"), "norm": ("weight",), "": ("A_log", "dt_bias", "D")},
    )
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg.mixers.mamba2
        self.layer_idx = layer_idx
        self.out_scale = residual_scale(cfg)
        c, d = self.cfg, cfg.d_model
        self.d_inner = c.expand * d
        self.num_heads = self.d_inner // c.head_dim
        self.conv_dim = self.d_inner + 2 * c.n_groups * c.d_state
        self.widths = group_widths(self.d_inner, c.d_state, c.n_groups, self.num_heads)

        self.in_proj = nn.Linear(d, self.d_inner + self.conv_dim + self.num_heads, bias=False)
        self.conv1d = ShortConv(self.conv_dim, c.d_conv, bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // c.n_groups, eps=c.norm_eps, gate_first=True)
        self.out_proj = nn.Linear(self.d_inner, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mamba_ssm's init: PyTorch-default in_proj and conv, A ~ U(A_init_range), dt_bias from
        log-uniform dt, D = 1, out_proj default / sqrt(residual branches)."""
        c = self.cfg
        self.in_proj.reset_parameters()
        self.conv1d.reset_parameters()
        init_decay_(self.A_log, self.dt_bias, c.A_init_range, c.dt_min, c.dt_max, c.dt_init_floor)
        nn.init.ones_(self.D)
        no_weight_decay(self.D)
        self.norm.reset_parameters()
        self.out_proj.reset_parameters()
        with torch.no_grad():
            self.out_proj.weight.mul_(self.out_scale)

    def forward(
        self, x: Tensor, cu_seqlens: Tensor | None = None, cache: dict | None = None, carry: dict | None = None
    ) -> Tensor:
        flat = as_one_sequence(x, cu_seqlens, cache)
        c, w = self.cfg, self.widths
        # The groups held here (all of them, or this rank's under tensor parallelism) follow from
        # the projection's width; head h reads group h // heads_per_group.
        z, xBC, dt = split_groups(self.in_proj(flat), [w.inner, sum(w.conv()), w.heads])  # [z_g | xBC_g | dt_g]
        xBC = conv_features(self.conv1d, xBC, cu_seqlens, cache, "conv")
        xs, Bs, Cs = split_groups(xBC, w.conv())
        xs = xs.unflatten(-1, (-1, c.head_dim))
        Bs, Cs = (t.unflatten(-1, (-1, c.d_state)).repeat_interleave(w.heads, dim=2) for t in (Bs, Cs))
        dt = F.softplus(dt + self.dt_bias).clamp(*c.dt_limit)
        A = -torch.exp(self.A_log)
        y = cached_recurrence(
            chunk_simple_gla, Cs, Bs, xs * dt[..., None], A * dt,
            scale=1.0, chunk_size=c.chunk_size, cu_seqlens=cu_seqlens, cache=cache,
        )
        y = y + self.D[:, None] * xs
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y.reshape(*x.shape[:-1], -1))

    def flops_per_token(self, seq_len: int) -> float:
        c = self.cfg
        ssd = chunked_recurrence_flops(min(c.chunk_size, seq_len), c.d_state, c.head_dim, delta_rule=False)
        return projection_flops(self) + self.num_heads * ssd


SPEC = MixerSpec(Mamba2Config, Mamba2)
