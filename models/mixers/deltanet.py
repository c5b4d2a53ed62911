"""DeltaNet mixer, docs/layers.md section 2 (fla `DeltaNet`, with negative eigenvalues as an
option): S_t = S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t / sqrt(d_k)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field
from torch import Tensor, nn

from models.layers.delta_rule import DeltaRuleMixer
from models.layers.gates import beta_of, write_strength
from models.ops import chunk_delta_rule
from models.spec import MixerConfig, MixerSpec

if TYPE_CHECKING:
    from models.config import ModelConfig


class DeltaNetConfig(MixerConfig):
    num_heads: int = Field(4, gt=0)
    head_dim: int | None = Field(None, gt=0, description="None = d_model // num_heads")
    expand_v: float = Field(1.0, gt=0)
    use_beta: bool = True
    use_gate: bool = False
    use_short_conv: bool = True
    conv_size: int = Field(4, gt=0)
    allow_neg_eigval: bool = False
    chunk_size: int = Field(64, gt=0)
    norm_eps: float = Field(1e-5, gt=0)

    def check_shapes(self, d_model: int) -> None:
        if self.head_dim is None and d_model % self.num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by mixers.deltanet.num_heads ({self.num_heads})")

    def tp_divides(self, d_model: int) -> dict[str, int]:
        return {"mixers.deltanet.num_heads": self.num_heads}


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
        beta = beta_of(self.b_proj(x)) if self.b_proj is not None else x.new_ones(q.shape[:-1])
        return q, k, v, write_strength(beta, self.cfg.allow_neg_eigval)


SPEC = MixerSpec(DeltaNetConfig, DeltaNet)
