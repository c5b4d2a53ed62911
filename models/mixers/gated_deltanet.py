"""Gated DeltaNet mixer, docs/layers.md section 3 (fla `GatedDeltaNet`):
S_t = alpha_t S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t / sqrt(d_k),
log alpha_t = -exp(A_log) softplus(a_t + dt_bias). With GVA (num_v_heads > num_heads) each
q/k head serves num_v_heads / num_heads consecutive value heads."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from models.layers.delta_rule import GatedDeltaRuleConfig, GatedDeltaRuleMixer
from models.ops import chunk_gated_delta_rule
from models.spec import MixerConfig, MixerSpec

if TYPE_CHECKING:
    from models.config import ModelConfig


class GatedDeltaNetConfig(GatedDeltaRuleConfig, MixerConfig):
    def tp_divides(self, d_model: int) -> dict[str, int]:
        """num_v_heads is a multiple of num_heads, so it divides too."""
        return {"mixers.gated_deltanet.num_heads": self.num_heads}


class GatedDeltaNet(GatedDeltaRuleMixer):
    op = staticmethod(chunk_gated_delta_rule)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, cfg.mixers.gated_deltanet, layer_idx)

    def recurrence_inputs(
        self, x: Tensor, cu_seqlens: Tensor | None = None, cache: dict | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """q, k (repeated to the value heads), v [B, T, H_v, D], g = log alpha and beta
        [B, T, H_v], exactly as the gated delta rule receives them."""
        q, k, v = self.qkv(x, cu_seqlens, cache)
        group = self.num_v_heads // self.num_heads
        q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
        g, beta = self.gates(x)
        return q, k, v, g, beta


SPEC = MixerSpec(GatedDeltaNetConfig, GatedDeltaNet)
