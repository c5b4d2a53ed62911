"""Gated DeltaNet mixer, docs/layers.md section 3 (fla `GatedDeltaNet`):
S_t = alpha_t S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t / sqrt(d_k),
log alpha_t = -exp(A_log) softplus(a_t + dt_bias). With GVA (num_v_heads > num_heads) each
q/k head serves num_v_heads / num_heads consecutive value heads."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from models.layers.delta_rule import DeltaRuleMixer
from models.layers.gates import GatedDecayConfig, log_decay, write_strength
from models.layers.init import init_decay_
from models.spec import MixerConfig, MixerSpec
from models.ops import chunk_gated_delta_rule

if TYPE_CHECKING:
    from models.config import ModelConfig


class GatedDeltaNetConfig(GatedDecayConfig, MixerConfig):
    num_heads: int = Field(4, gt=0, description="query/key heads")
    num_v_heads: int | None = Field(None, gt=0, description="value heads (GVA); a multiple of num_heads")
    head_dim: int = Field(64, gt=0)
    expand_v: float = Field(2.0, gt=0)
    use_short_conv: bool = True
    conv_size: int = Field(4, gt=0)
    allow_neg_eigval: bool = False

    @model_validator(mode="after")
    def _gva(self) -> "GatedDeltaNetConfig":
        if self.num_v_heads is not None and self.num_v_heads % self.num_heads:
            raise ValueError(
                f"num_v_heads ({self.num_v_heads}) must be a multiple of num_heads ({self.num_heads})"
            )
        return self

    def tp_divides(self, model: ModelConfig) -> dict[str, int]:
        """num_v_heads is a multiple of num_heads, so it divides too."""
        return {"mixers.gated_deltanet.num_heads": self.num_heads}


class GatedDeltaNet(DeltaRuleMixer):
    op = staticmethod(chunk_gated_delta_rule)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        c = cfg.mixers.gated_deltanet
        v_heads = c.num_v_heads or c.num_heads
        super().__init__(
            cfg, c.num_heads, v_heads, c.head_dim, int(c.expand_v * c.head_dim),
            c.use_short_conv, c.conv_size, use_gate=True, norm_eps=c.norm_eps, chunk_size=c.chunk_size,
        )
        self.cfg = c
        self.layer_idx = layer_idx
        self.a_proj = nn.Linear(cfg.d_model, v_heads, bias=False)
        self.b_proj = nn.Linear(cfg.d_model, v_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(v_heads))
        self.dt_bias = nn.Parameter(torch.empty(v_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fla: Linear and conv ~ N(0, init_std); A ~ U(0, 16), dt_bias as Mamba2."""
        c = self.cfg
        super().reset_parameters()
        init_decay_(self.A_log, self.dt_bias, c.A_init_range, c.dt_min, c.dt_max, c.dt_init_floor)

    def recurrence_inputs(
        self, x: Tensor, cu_seqlens: Tensor | None = None, cache: dict | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """q, k (repeated to the value heads), v [B, T, H_v, D], g = log alpha and beta
        [B, T, H_v], exactly as the gated delta rule receives them."""
        q, k, v = self.qkv(x, cu_seqlens, cache)
        group = self.num_v_heads // self.num_heads
        q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
        g = log_decay(self.a_proj(x), self.A_log, self.dt_bias)
        beta = write_strength(self.b_proj(x).sigmoid(), self.cfg.allow_neg_eigval)
        return q, k, v, g, beta


SPEC = MixerSpec(GatedDeltaNetConfig, GatedDeltaNet)
