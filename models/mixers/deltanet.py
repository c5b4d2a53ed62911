"""DeltaNet mixer, specs/layers.md section 2 (fla `DeltaNet`, with negative eigenvalues as an
option): S_t = S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t / sqrt(d_k)."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from models.config import ModelConfig
from models.mixers.conv import ShortConv, conv_features
from models.mixers.flops import chunked_recurrence_flops, projection_flops
from models.mixers.init import init_normal_, residual_scale
from models.mixers.packing import as_one_sequence
from models.mixers.recurrence import ChunkOp, cached_recurrence
from models.norms import GatedRMSNorm, RMSNorm, l2_norm
from models.ops import chunk_delta_rule


def write_strength(beta: Tensor, allow_neg_eigval: bool) -> Tensor:
    """beta in (0, 1) gives transition eigenvalues 1 - beta in [0, 1]; doubling it to (0, 2)
    extends them to [-1, 1] (Grazzi et al., state tracking)."""
    return 2.0 * beta if allow_neg_eigval else beta


class DeltaRuleMixer(nn.Module):
    """What DeltaNet and Gated DeltaNet share: q, k, v projections (no bias), each followed by a
    short convolution and SiLU, q and k l2-normalised per head; the chunked op (`op`, fed by the
    subclass's `recurrence_inputs`); the output RMSNorm per value head (gated by g_proj(x) when
    `use_gate`) and out_proj. Subclasses add their gates and call reset_parameters() last."""

    op: ClassVar[ChunkOp]

    def __init__(
        self,
        cfg: ModelConfig,
        heads: int,
        v_heads: int,
        head_k_dim: int,
        head_v_dim: int,
        use_short_conv: bool,
        conv_size: int,
        use_gate: bool,
        norm_eps: float,
        chunk_size: int,
    ):
        super().__init__()
        d = cfg.d_model
        self.init_std = cfg.init_std
        self.out_scale = residual_scale(cfg)
        self.num_heads, self.num_v_heads = heads, v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.chunk_size = chunk_size
        key_dim, value_dim = heads * head_k_dim, v_heads * head_v_dim
        self.q_proj = nn.Linear(d, key_dim, bias=False)
        self.k_proj = nn.Linear(d, key_dim, bias=False)
        self.v_proj = nn.Linear(d, value_dim, bias=False)
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (
            ShortConv(width, conv_size) if use_short_conv else None for width in (key_dim, key_dim, value_dim)
        )
        self.g_proj = nn.Linear(d, value_dim, bias=False) if use_gate else None
        self.o_norm = GatedRMSNorm(head_v_dim, eps=norm_eps) if use_gate else RMSNorm(head_v_dim, eps=norm_eps)
        self.out_proj = nn.Linear(value_dim, d, bias=False)

    def reset_parameters(self) -> None:
        """fla: every Linear and conv ~ N(0, init_std); out_proj also / sqrt(residual branches)."""
        init_normal_(self, self.init_std)
        self.o_norm.reset_parameters()
        with torch.no_grad():
            self.out_proj.weight.mul_(self.out_scale)

    def qkv(self, x: Tensor, cu_seqlens: Tensor | None, cache: dict | None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k [B, T, H, d_k] (unit norm), v [B, T, H_v, d_v]."""
        q = conv_features(self.q_conv1d, self.q_proj(x), cu_seqlens, cache, "conv_q")
        k = conv_features(self.k_conv1d, self.k_proj(x), cu_seqlens, cache, "conv_k")
        v = conv_features(self.v_conv1d, self.v_proj(x), cu_seqlens, cache, "conv_v")
        q, k = (l2_norm(t.unflatten(-1, (-1, self.head_k_dim))) for t in (q, k))
        return q, k, v.unflatten(-1, (-1, self.head_v_dim))

    def recurrence_inputs(
        self, x: Tensor, cu_seqlens: Tensor | None = None, cache: dict | None = None
    ) -> tuple[Tensor, ...]:
        """The positional inputs of `op`: q, k, v, then beta (DeltaNet) or g, beta (GDN)."""
        raise NotImplementedError

    def forward(
        self, x: Tensor, cu_seqlens: Tensor | None = None, cache: dict | None = None, carry: dict | None = None
    ) -> Tensor:
        flat = as_one_sequence(x, cu_seqlens, cache)
        o = cached_recurrence(
            self.op, *self.recurrence_inputs(flat, cu_seqlens, cache),
            scale=self.head_k_dim**-0.5, chunk_size=self.chunk_size, cu_seqlens=cu_seqlens, cache=cache,
        )
        if self.g_proj is None:
            o = self.o_norm(o)
        else:
            o = self.o_norm(o, self.g_proj(flat).unflatten(-1, (-1, self.head_v_dim)))
        return self.out_proj(o.reshape(*x.shape[:-1], -1))

    def flops_per_token(self, seq_len: int) -> float:
        chunk = min(self.chunk_size, seq_len)
        core = chunked_recurrence_flops(chunk, self.head_k_dim, self.head_v_dim, delta_rule=True)
        return projection_flops(self) + self.num_v_heads * core


class DeltaNet(DeltaRuleMixer):
    op = staticmethod(chunk_delta_rule)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        c = cfg.mixers.deltanet
        head_k_dim = c.head_dim or cfg.d_model // c.num_heads
        super().__init__(
            cfg, c.num_heads, c.num_heads, head_k_dim, int(c.expand_v * head_k_dim),
            c.use_short_conv, c.conv_size, c.use_gate, c.norm_eps, c.chunk_size,
        )
        self.cfg = c
        self.layer_idx = layer_idx
        self.b_proj = nn.Linear(cfg.d_model, c.num_heads, bias=False) if c.use_beta else None
        self.reset_parameters()

    def recurrence_inputs(
        self, x: Tensor, cu_seqlens: Tensor | None = None, cache: dict | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k, v and beta [B, T, H] exactly as the delta rule receives them (x is [1, total, d]
        when cu_seqlens packs documents)."""
        q, k, v = self.qkv(x, cu_seqlens, cache)
        beta = self.b_proj(x).sigmoid() if self.b_proj is not None else x.new_ones(q.shape[:-1])
        return q, k, v, write_strength(beta, self.cfg.allow_neg_eigval)
