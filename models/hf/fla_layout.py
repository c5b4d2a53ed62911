"""What fla's delta-rule models (GatedDeltaNetForCausalLM, DeltaNetForCausalLM: the models flame
pretrains) share as a Hugging Face format: their parameter names, the config entries of the
model around the mixer, and fla's defaults for them. Each mixer's `HFNative` builds on these."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.config import ModelConfig

_LAYER = "model.layers.{i}."


def fla_names(mixer_params: Iterable[str]) -> dict[str, str]:
    """ebb parameter name -> fla's, for a model whose mixer holds `mixer_params` (names under
    `blocks.{i}.mixer.`; fla calls the mixer `attn` and its output projection `o_proj`)."""
    mixer = {f"blocks.{{i}}.mixer.{p}": _LAYER + "attn." + p.replace("out_proj", "o_proj") for p in mixer_params}
    return {
        "embed.weight": "model.embeddings.weight",
        "blocks.{i}.mixer_norm.weight": _LAYER + "attn_norm.weight",
        **mixer,
        "blocks.{i}.mlp_norm.weight": _LAYER + "mlp_norm.weight",
        **{f"blocks.{{i}}.mlp.{p}.weight": f"{_LAYER}mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")},
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }


def check_fla_model(model: ModelConfig, section: str, mixer_norm_eps: float, use_short_conv: bool) -> None:
    """ValueError (one line) where the model around the mixer is not fla's."""
    if model.mlp != "swiglu":
        raise ValueError("model.mlp is none, but fla's delta-rule blocks have a SwiGLU MLP")
    if mixer_norm_eps != model.norm_eps:
        raise ValueError(f"mixers.{section}.norm_eps differs from model.norm_eps: fla's models have one norm_eps")
    if not use_short_conv:
        raise ValueError(f"mixers.{section}.use_short_conv is false: fla's layer without convolutions is not ebb's")


def fla_model_entries(model: ModelConfig) -> dict[str, Any]:
    """fla's config entries for the model around the mixer."""
    return {
        "vocab_size": model.vocab_size, "hidden_size": model.d_model, "num_hidden_layers": model.n_layers,
        "intermediate_size": model.mlp_width, "hidden_act": "swish", "norm_eps": model.norm_eps,
        "tie_word_embeddings": model.tie_embeddings, "attn": None, "use_short_conv": True,
    }


def fla_mlp_width(hidden_size: int, hidden_ratio: float) -> int:
    """fla's GatedMLP width when intermediate_size is not given: 2/3 of hidden_ratio x hidden_size,
    rounded up to a multiple of 256."""
    return -(-int(hidden_size * hidden_ratio * 2 / 3) // 256) * 256


def ebb_model_section(hf: Mapping[str, Any], kind: str, section: str, default_layers: int, mixer: dict[str, Any]) -> dict[str, Any]:
    """The ebb `model` section of an fla config (fla's defaults where a key is missing) whose
    blocks are all `kind`, with `mixer` as mixers.`section`; ValueError naming what ebb cannot express."""
    if hf.get("hidden_act", "swish") not in ("swish", "silu"):
        raise ValueError(f"hidden_act {hf['hidden_act']!r}: ebb's MLP is SwiGLU (silu)")
    if (hf.get("attn") or {}).get("layers"):
        raise ValueError("attention layers (attn.layers): ebb imports fla's models of one mixer")
    if hf.get("attnres_block_size"):
        raise ValueError("attnres_block_size: ebb's blocks have plain residuals")
    if not hf.get("use_short_conv", True):
        raise ValueError("use_short_conv: false: ebb's delta-rule layers without convolutions are not fla's")
    hidden = hf.get("hidden_size", 2048)
    return {
        "pattern": kind * hf.get("num_hidden_layers", default_layers), "d_model": hidden, "vocab_size": hf.get("vocab_size", 32000),
        "mlp": "swiglu", "mlp_hidden": hf.get("intermediate_size") or fla_mlp_width(hidden, hf.get("hidden_ratio") or 4),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "norm_eps": hf.get("norm_eps", 1e-6),
        "mixers": {section: {**mixer, "use_short_conv": True, "conv_size": hf.get("conv_size", 4), "norm_eps": hf.get("norm_eps", 1e-6)}},
    }

