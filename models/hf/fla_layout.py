"""What fla's delta-rule models (GatedDeltaNetForCausalLM, DeltaNetForCausalLM,
GatedDeltaProductForCausalLM: models flame pretrains) share as a Hugging Face format: their parameter names, the config entries of the
model around the mixer, and fla's defaults for them. Each mixer's `HFNative` builds on these.

fla's models hold softmax-attention layers beside their own (`attn`: the layer indices and one
attention config, or a list of such), so an ebb hybrid of that mixer and `*` blocks is one of them.
fla's attention has head_dim = hidden_size / num_heads, rotate-half RoPE and a window that
counts the query, as ebb's."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.config import ModelConfig

_LAYER = "model.layers.{i}."
# the parameters of ebb's delta-rule mixers (models/layers/delta_rule.py), as fla's layers name them too
DELTA_RULE_PARAMS = tuple(
    f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "g_proj", "b_proj", "q_conv1d", "k_conv1d", "v_conv1d", "o_norm", "out_proj")
)
DECAY_PARAMS = ("a_proj.weight", "A_log", "dt_bias")  # the gated ones' decay gate


def fla_names(mixer_params: Iterable[str]) -> dict[str, str]:
    """ebb parameter name -> fla's, for a model whose mixer holds `mixer_params` (names under
    `blocks.{i}.mixer.`; fla calls the mixer `attn` and its output projection `o_proj`)."""
    attention = [f"{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")] + ["out_proj.weight"]
    mixer = {f"blocks.{{i}}.mixer.{p}": _LAYER + "attn." + p.replace("out_proj", "o_proj") for p in [*mixer_params, *attention]}
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
    a = model.mixers.attention
    if "*" in model.blocks and (a.head_dim or model.d_model // a.num_heads) * a.num_heads != model.d_model:
        raise ValueError("mixers.attention.head_dim x num_heads is not d_model: fla's attention heads split the model's width")


def fla_model_entries(model: ModelConfig) -> dict[str, Any]:
    """fla's config entries for the model around the mixer."""
    return {
        "vocab_size": model.vocab_size, "hidden_size": model.d_model, "num_hidden_layers": model.n_layers,
        "intermediate_size": model.mlp_width, "hidden_act": "swish", "norm_eps": model.norm_eps,
        "tie_word_embeddings": model.tie_embeddings, "attn": fla_attention(model), "use_short_conv": True,
    }


def fla_attention(model: ModelConfig) -> dict[str, Any] | None:
    """fla's `attn` entry for the model's attention blocks (None without any)."""
    layers = [i for i, kind in enumerate(model.blocks) if kind == "*"]
    if not layers:
        return None
    a = model.mixers.attention
    return {"layers": layers, "num_heads": a.num_heads, "num_kv_heads": a.kv_heads, "qkv_bias": a.qkv_bias,
            "window_size": a.window_size, "rope_theta": a.rope_theta}


def ebb_attention(hf: Mapping[str, Any], layers: int) -> tuple[list[int], dict[str, Any]]:
    """The attention layers of an fla config and ebb's mixers.attention for them (ValueError
    where they differ in anything but their layers: ebb's attention blocks share one config)."""
    specs = hf.get("attn") or []
    specs = [specs] if isinstance(specs, Mapping) else list(specs)
    settings = [{k: spec.get(k, default) for k, default in
                 (("num_heads", None), ("num_kv_heads", None), ("qkv_bias", False), ("window_size", None), ("rope_theta", 10000.0))}
                for spec in specs]
    if any(s != settings[0] for s in settings[1:]):
        raise ValueError("attention layers with different settings (attn as a list): ebb's attention blocks share one config")
    at = sorted(i for spec in specs for i in spec.get("layers", []))
    if any(not 0 <= i < layers for i in at):
        raise ValueError(f"attn.layers {at} reach past num_hidden_layers ({layers})")
    if not at:
        return [], {}
    s = settings[0]
    return at, {"num_heads": s["num_heads"], "num_kv_heads": s["num_kv_heads"] or s["num_heads"], "head_dim": None,
                "qkv_bias": bool(s["qkv_bias"]), "window_size": s["window_size"], "rope_theta": s["rope_theta"]}


def fla_mlp_width(hidden_size: int, hidden_ratio: float) -> int:
    """fla's GatedMLP width when intermediate_size is not given: 2/3 of hidden_ratio x hidden_size,
    rounded up to a multiple of 256."""
    return -(-int(hidden_size * hidden_ratio * 2 / 3) // 256) * 256


def ebb_model_section(hf: Mapping[str, Any], kind: str, section: str, default_layers: int, mixer: dict[str, Any]) -> dict[str, Any]:
    """The ebb `model` section of an fla config (fla's defaults where a key is missing): `kind`
    blocks with `mixer` as mixers.`section`, and attention blocks at fla's attention layers;
    ValueError naming what ebb cannot express."""
    if hf.get("hidden_act", "swish") not in ("swish", "silu"):
        raise ValueError(f"hidden_act {hf['hidden_act']!r}: ebb's MLP is SwiGLU (silu)")
    if hf.get("attnres_block_size"):
        raise ValueError("attnres_block_size: ebb's blocks have plain residuals")
    if not hf.get("use_short_conv", True):
        raise ValueError("use_short_conv: false: ebb's delta-rule layers without convolutions are not fla's")
    hidden, layers = hf.get("hidden_size", 2048), hf.get("num_hidden_layers", default_layers)
    attention_layers, attention = ebb_attention(hf, layers)
    pattern = "".join("*" if i in attention_layers else kind for i in range(layers))
    return {
        "pattern": pattern, "d_model": hidden, "vocab_size": hf.get("vocab_size", 32000),
        "mlp": "swiglu", "mlp_hidden": hf.get("intermediate_size") or fla_mlp_width(hidden, hf.get("hidden_ratio") or 4),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "norm_eps": hf.get("norm_eps", 1e-6),
        "mixers": {
            section: {**mixer, "use_short_conv": True, "conv_size": hf.get("conv_size", 4), "norm_eps": hf.get("norm_eps", 1e-6)},
            **({"attention": attention} if attention else {}),
        },
    }

