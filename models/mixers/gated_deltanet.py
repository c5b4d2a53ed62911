"""Gated DeltaNet mixer, docs/layers.md section 3 (fla `GatedDeltaNet`):
S_t = alpha_t S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t / sqrt(d_k),
log alpha_t = -exp(A_log) softplus(a_t + dt_bias). With GVA (num_v_heads > num_heads) each
q/k head serves num_v_heads / num_heads consecutive value heads."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

from models.hf.fla_layout import DECAY_PARAMS, DELTA_RULE_PARAMS, check_fla_model, ebb_model_section, fla_model_entries, fla_names
from models.layers.delta_rule import GatedDeltaRuleConfig, GatedDeltaRuleMixer
from models.ops import chunk_gated_delta_rule
from models.spec import HFNative, MixerConfig, MixerSpec

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
        """q, k [B, T, H, D], v [B, T, H_v, D], g = log alpha and beta [B, T, H_v], exactly as
        the gated delta rule receives them (with GVA, H < H_v: the op shares each q/k head, fla's
        kernel without copying it)."""
        q, k, v = self.qkv(x, cu_seqlens, cache)
        g, beta = self.gates(x)
        return q, k, v, g, beta


# --- Hugging Face: a Gated DeltaNet-only model is fla's GatedDeltaNetForCausalLM (the model flame
# pretrains; `import fla` registers it with transformers' Auto classes) -----------------------------

HF_NAMES = fla_names(DELTA_RULE_PARAMS + DECAY_PARAMS)


def hf_architecture(model: ModelConfig) -> str:
    c = model.mixers.gated_deltanet
    check_fla_model(model, "gated_deltanet", c.norm_eps, c.use_short_conv)
    return "GatedDeltaNetForCausalLM"


def hf_config(model: ModelConfig) -> dict[str, Any]:
    c = model.mixers.gated_deltanet
    return fla_model_entries(model) | {
        "num_heads": c.num_heads, "num_v_heads": c.num_v_heads, "head_dim": c.head_dim, "expand_v": c.expand_v,
        "use_gate": True, "output_gate_activation": "swish", "conv_size": c.conv_size, "allow_neg_eigval": c.allow_neg_eigval,
    }


def hf_model_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The ebb `model` section of an fla GatedDeltaNet config (fla's defaults where a key is missing)."""
    if not hf.get("use_gate", True) or hf.get("output_gate_activation", "swish") not in ("swish", "silu"):
        raise ValueError("use_gate: false or a sigmoid output gate: ebb's Gated DeltaNet gates its output norm with SiLU")
    mixer = {
        "num_heads": hf.get("num_heads", 6), "num_v_heads": hf.get("num_v_heads"), "head_dim": hf.get("head_dim", 256),
        "expand_v": hf.get("expand_v", 2.0), "allow_neg_eigval": bool(hf.get("allow_neg_eigval", False)),
    }
    return ebb_model_section(hf, "G", "gated_deltanet", 21, mixer)


HF = HFNative(
    architectures=("GatedDeltaNetForCausalLM",), architecture=hf_architecture, config=hf_config,
    model_config=hf_model_config, names=HF_NAMES, model_type="gated_deltanet", hybrid_with=("attention",),
)

SPEC = MixerSpec(GatedDeltaNetConfig, GatedDeltaNet, hf=HF)
