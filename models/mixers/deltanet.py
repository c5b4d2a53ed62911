"""DeltaNet mixer, docs/layers.md section 2 (fla `DeltaNet`, with negative eigenvalues as an
option): S_t = S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t / sqrt(d_k)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import Field
from torch import Tensor, nn

from models.hf.fla_layout import DELTA_RULE_PARAMS, check_fla_model, ebb_model_section, fla_model_entries, fla_names
from models.layers.delta_rule import DeltaRuleMixer
from models.layers.gates import beta_of, write_strength
from models.ops import chunk_delta_rule
from models.spec import HFNative, MixerConfig, MixerSpec

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


# --- Hugging Face: a DeltaNet-only model is fla's DeltaNetForCausalLM (flame's delta_net configs;
# `import fla` registers it with transformers' Auto classes). fla sizes the heads by the model's
# width (expand_k, expand_v), ebb by the key head (head_dim, expand_v) ------------------------------

HF_NAMES = fla_names(DELTA_RULE_PARAMS)


def _head_dims(model: ModelConfig) -> tuple[int, int]:
    c = model.mixers.deltanet
    head_k_dim = c.head_dim or model.d_model // c.num_heads
    return head_k_dim, int(c.expand_v * head_k_dim)


def hf_architecture(model: ModelConfig) -> str:
    c = model.mixers.deltanet
    check_fla_model(model, "deltanet", c.norm_eps, c.use_short_conv)
    return "DeltaNetForCausalLM"


def hf_config(model: ModelConfig) -> dict[str, Any]:
    c = model.mixers.deltanet
    head_k_dim, head_v_dim = _head_dims(model)
    return fla_model_entries(model) | {
        "num_heads": c.num_heads, "expand_k": c.num_heads * head_k_dim / model.d_model, "expand_v": c.num_heads * head_v_dim / model.d_model,
        "use_beta": c.use_beta, "use_gate": c.use_gate, "use_output_norm": True, "qk_activation": "silu", "qk_norm": "l2",
        "conv_size": c.conv_size, "allow_neg_eigval": c.allow_neg_eigval,
    }


def hf_model_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The ebb `model` section of an fla DeltaNet config (fla's defaults where a key is missing)."""
    if hf.get("qk_activation", "silu") != "silu" or hf.get("qk_norm", "l2") != "l2" or not hf.get("use_output_norm", True):
        raise ValueError("qk_activation, qk_norm or use_output_norm off fla's defaults (silu, l2, true): ebb's DeltaNet is those")
    hidden, heads = hf.get("hidden_size", 2048), hf.get("num_heads", 16)
    head_k_dim, head_v_dim = round(hidden * hf.get("expand_k", 1.0)) // heads, round(hidden * hf.get("expand_v", 1.0)) // heads
    mixer = {
        "num_heads": heads, "head_dim": head_k_dim, "expand_v": head_v_dim / head_k_dim, "use_beta": bool(hf.get("use_beta", True)),
        "use_gate": bool(hf.get("use_gate", False)), "allow_neg_eigval": bool(hf.get("allow_neg_eigval", False)),
    }
    return ebb_model_section(hf, "T", "deltanet", 24, mixer)


HF = HFNative(
    architectures=("DeltaNetForCausalLM",), architecture=hf_architecture, config=hf_config,
    model_config=hf_model_config, names=HF_NAMES, model_type="delta_net", hybrid_with=("attention",),
)

SPEC = MixerSpec(DeltaNetConfig, DeltaNet, hf=HF)
