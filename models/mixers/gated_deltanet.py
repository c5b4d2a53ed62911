"""Gated DeltaNet mixer, docs/layers.md section 3 (fla `GatedDeltaNet`):
S_t = alpha_t S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t / sqrt(d_k),
log alpha_t = -exp(A_log) softplus(a_t + dt_bias). With GVA (num_v_heads > num_heads) each
q/k head serves num_v_heads / num_heads consecutive value heads."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

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
        """q, k (repeated to the value heads), v [B, T, H_v, D], g = log alpha and beta
        [B, T, H_v], exactly as the gated delta rule receives them."""
        q, k, v = self.qkv(x, cu_seqlens, cache)
        group = self.num_v_heads // self.num_heads
        q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
        g, beta = self.gates(x)
        return q, k, v, g, beta


# --- Hugging Face: a Gated DeltaNet-only model is fla's GatedDeltaNetForCausalLM (the model flame
# pretrains; `import fla` registers it with transformers' Auto classes), with these names ----------

_LAYER = "model.layers.{i}."
HF_NAMES = {
    "embed.weight": "model.embeddings.weight",
    "blocks.{i}.mixer_norm.weight": _LAYER + "attn_norm.weight",
    **{f"blocks.{{i}}.mixer.{p}.weight": f"{_LAYER}attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj")},
    **{f"blocks.{{i}}.mixer.{c}_conv1d.weight": f"{_LAYER}attn.{c}_conv1d.weight" for c in "qkv"},
    "blocks.{i}.mixer.A_log": _LAYER + "attn.A_log",
    "blocks.{i}.mixer.dt_bias": _LAYER + "attn.dt_bias",
    "blocks.{i}.mixer.o_norm.weight": _LAYER + "attn.o_norm.weight",
    "blocks.{i}.mixer.out_proj.weight": _LAYER + "attn.o_proj.weight",
    "blocks.{i}.mlp_norm.weight": _LAYER + "mlp_norm.weight",
    **{f"blocks.{{i}}.mlp.{p}.weight": f"{_LAYER}mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")},
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def hf_architecture(model: ModelConfig) -> str:
    c = model.mixers.gated_deltanet
    if model.mlp != "swiglu":
        raise ValueError("model.mlp is none, but fla's GatedDeltaNet blocks have a SwiGLU MLP")
    if c.norm_eps != model.norm_eps:
        raise ValueError("mixers.gated_deltanet.norm_eps differs from model.norm_eps: fla's GatedDeltaNet has one norm_eps")
    if not c.use_short_conv:
        raise ValueError("mixers.gated_deltanet.use_short_conv is false: fla's layer without convolutions is not ebb's")
    return "GatedDeltaNetForCausalLM"


def hf_config(model: ModelConfig) -> dict[str, Any]:
    c = model.mixers.gated_deltanet
    return {
        "vocab_size": model.vocab_size, "hidden_size": model.d_model, "num_hidden_layers": model.n_layers,
        "num_heads": c.num_heads, "num_v_heads": c.num_v_heads, "head_dim": c.head_dim, "expand_v": c.expand_v,
        "use_gate": True, "output_gate_activation": "swish", "use_short_conv": True, "conv_size": c.conv_size,
        "allow_neg_eigval": c.allow_neg_eigval, "intermediate_size": model.mlp_width, "hidden_act": "swish",
        "norm_eps": model.norm_eps, "tie_word_embeddings": model.tie_embeddings, "attn": None,
    }


def fla_mlp_width(hidden_size: int, hidden_ratio: float) -> int:
    """fla's GatedMLP width when intermediate_size is not given: 2/3 of hidden_ratio x hidden_size,
    rounded up to a multiple of 256."""
    return -(-int(hidden_size * hidden_ratio * 2 / 3) // 256) * 256


def hf_model_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The ebb `model` section of an fla GatedDeltaNet config (fla's defaults where a key is missing)."""
    if not hf.get("use_gate", True) or hf.get("output_gate_activation", "swish") not in ("swish", "silu"):
        raise ValueError("use_gate: false or a sigmoid output gate: ebb's Gated DeltaNet gates its output norm with SiLU")
    if not hf.get("use_short_conv", True):
        raise ValueError("use_short_conv: false: ebb's Gated DeltaNet without convolutions is not fla's")
    if hf.get("hidden_act", "swish") not in ("swish", "silu"):
        raise ValueError(f"hidden_act {hf['hidden_act']!r}: ebb's MLP is SwiGLU (silu)")
    if (hf.get("attn") or {}).get("layers"):
        raise ValueError("attention layers (attn.layers): ebb imports fla's Gated DeltaNet-only models")
    if hf.get("attnres_block_size"):
        raise ValueError("attnres_block_size: ebb's blocks have plain residuals")
    hidden, eps = hf.get("hidden_size", 2048), hf.get("norm_eps", 1e-6)
    return {
        "pattern": "G" * hf.get("num_hidden_layers", 21), "d_model": hidden, "vocab_size": hf.get("vocab_size", 32000),
        "mlp": "swiglu", "mlp_hidden": hf.get("intermediate_size") or fla_mlp_width(hidden, hf.get("hidden_ratio") or 4),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "norm_eps": eps,
        "mixers": {"gated_deltanet": {
            "num_heads": hf.get("num_heads", 6), "num_v_heads": hf.get("num_v_heads"), "head_dim": hf.get("head_dim", 256),
            "expand_v": hf.get("expand_v", 2.0), "use_short_conv": True, "conv_size": hf.get("conv_size", 4),
            "allow_neg_eigval": bool(hf.get("allow_neg_eigval", False)), "norm_eps": eps,
        }},
    }


HF = HFNative(
    architectures=("GatedDeltaNetForCausalLM",), architecture=hf_architecture, config=hf_config,
    model_config=hf_model_config, names=HF_NAMES, model_type="gated_deltanet",
)

SPEC = MixerSpec(GatedDeltaNetConfig, GatedDeltaNet, hf=HF)
