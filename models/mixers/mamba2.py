"""Mamba2 (SSD) mixer, docs/layers.md section 1.

Parameter names are those of transformers' `Mamba2Mixer` (and mamba_ssm). The in_proj rows are
stored group-major, [z_g | x_g | B_g | C_g | dt_g] for each group g, and the conv channels
[x_g | B_g | C_g]: a contiguous slice of whole groups is then a Mamba2 with fewer groups, which is
what a tensor-parallel rank holds, at every tp. With n_groups = 1 this is transformers' layout
[z | x | B | C | dt]; otherwise `models.hf.mamba2_layout` converts. The SSD recurrence is
`chunk_simple_gla` with q = C, k = B, v = x * dt, g = A * dt and no scale.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from common.config import OpenBound
from models.layers.conv import ShortConv, conv_features
from models.layers.flops import chunked_recurrence_flops, projection_flops
from models.layers.fused import group_widths, split_groups
from models.layers.init import init_decay_, no_weight_decay, residual_scale
from models.layers.norms import GatedRMSNorm
from models.layers.recurrence import cached_recurrence
from models.ops import chunk_simple_gla
from models.packing import as_one_sequence
from models.spec import ContextParallelPlan, HFNative, Mixer, MixerConfig, MixerSpec, TensorParallelPlan

if TYPE_CHECKING:
    from models.config import ModelConfig


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

    def check_shapes(self, d_model: int) -> None:
        d_inner = self.expand * d_model
        if d_inner % self.head_dim:
            raise ValueError(f"expand*d_model ({d_inner}) must be divisible by mixers.mamba2.head_dim ({self.head_dim})")
        if (d_inner // self.head_dim) % self.n_groups:
            raise ValueError(f"mamba2 heads ({d_inner // self.head_dim}) must be divisible by mixers.mamba2.n_groups ({self.n_groups})")

    def tp_divides(self, d_model: int) -> dict[str, int]:
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
    cp_plan = ContextParallelPlan(transition="decay", conv="d_conv")  # SSD: a scalar decay per head
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
            scale=1.0, chunk_size=c.chunk_size, cu_seqlens=cu_seqlens, cache=cache, transition=self.cp_plan.transition,
        )
        y = y + self.D[:, None] * xs
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y.reshape(*x.shape[:-1], -1))

    def flops_per_token(self, seq_len: int) -> float:
        c = self.cfg
        ssd = chunked_recurrence_flops(min(c.chunk_size, seq_len), c.d_state, c.head_dim, delta_rule=False)
        return projection_flops(self) + self.num_heads * ssd


# --- Hugging Face: a Mamba2-only model without MLPs is transformers' Mamba2ForCausalLM, with
# these names; in_proj and conv1d rows reorder when n_groups > 1 (models/hf/mamba2_layout.py) -------

_LAYER = "backbone.layers.{i}."
HF_NAMES = {
    "embed.weight": "backbone.embeddings.weight",
    "blocks.{i}.mixer_norm.weight": _LAYER + "norm.weight",
    **{f"blocks.{{i}}.mixer.{p}": f"{_LAYER}mixer.{p}" for p in (
        "in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")},
    "norm.weight": "backbone.norm_f.weight",
    "lm_head.weight": "lm_head.weight",
}


def hf_architecture(model: ModelConfig) -> str:
    if model.mlp != "none":
        raise ValueError("model.mlp is swiglu, but transformers' Mamba2 blocks have no MLP (model.mlp: none)")
    if model.mixers.mamba2.norm_eps != model.norm_eps:
        raise ValueError("mixers.mamba2.norm_eps differs from model.norm_eps: transformers' Mamba2 has one layer_norm_epsilon")
    return "Mamba2ForCausalLM"


def hf_config(model: ModelConfig) -> dict[str, Any]:
    c = model.mixers.mamba2
    return {
        "vocab_size": model.vocab_size, "hidden_size": model.d_model, "num_hidden_layers": model.n_layers,
        "state_size": c.d_state, "expand": c.expand, "n_groups": c.n_groups, "head_dim": c.head_dim,
        "num_heads": c.expand * model.d_model // c.head_dim, "conv_kernel": c.d_conv, "use_conv_bias": c.conv_bias,
        "use_bias": False, "chunk_size": c.chunk_size, "time_step_limit": tuple(c.dt_limit), "time_step_min": c.dt_min,
        "time_step_max": c.dt_max, "time_step_floor": c.dt_init_floor, "layer_norm_epsilon": model.norm_eps,
        "rms_norm": True, "residual_in_fp32": False, "hidden_act": "silu", "tie_word_embeddings": model.tie_embeddings,
    }


def hf_model_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The ebb `model` section of a transformers Mamba2 config (a dict with its defaults)."""
    if hf.get("use_bias") or not hf.get("rms_norm", True) or hf.get("hidden_act", "silu") != "silu":
        raise ValueError("use_bias, rms_norm: false or a hidden_act other than silu: ebb's Mamba2 is mamba_ssm's default")
    if hf["num_heads"] * hf["head_dim"] != hf["expand"] * hf["hidden_size"]:
        raise ValueError(f"num_heads * head_dim ({hf['num_heads']} * {hf['head_dim']}) is not expand * hidden_size: ebb derives the heads from them")
    return {
        "pattern": "M" * hf["num_hidden_layers"], "d_model": hf["hidden_size"], "vocab_size": hf["vocab_size"],
        "mlp": "none", "tie_embeddings": bool(hf.get("tie_word_embeddings")), "norm_eps": hf["layer_norm_epsilon"],
        "mixers": {"mamba2": {
            "d_state": hf["state_size"], "d_conv": hf["conv_kernel"], "expand": hf["expand"], "head_dim": hf["head_dim"],
            "n_groups": hf["n_groups"], "chunk_size": hf["chunk_size"], "conv_bias": hf["use_conv_bias"],
            "dt_limit": tuple(hf.get("time_step_limit") or (0.0, float("inf"))), "dt_min": hf.get("time_step_min", 1e-3),
            "dt_max": hf.get("time_step_max", 0.1), "dt_init_floor": hf.get("time_step_floor", 1e-4),
            "norm_eps": hf["layer_norm_epsilon"],
        }},
    }


def _layout(model: ModelConfig) -> tuple[int, int, int, int]:
    c = model.mixers.mamba2
    return c.expand * model.d_model, c.d_state, c.n_groups, c.expand * model.d_model // c.head_dim


def hf_to(model: ModelConfig, name: str, tensor: Tensor) -> Tensor:
    from models.hf.mamba2_layout import to_transformers_layout  # it imports this module

    return to_transformers_layout({name: tensor}, *_layout(model))[name]


def hf_from(model: ModelConfig, name: str, tensor: Tensor) -> Tensor:
    from models.hf.mamba2_layout import from_transformers_layout

    return from_transformers_layout({name: tensor}, *_layout(model))[name]


HF = HFNative(
    architectures=("Mamba2ForCausalLM",), architecture=hf_architecture, config=hf_config,
    model_config=hf_model_config, names=HF_NAMES, to_hf=hf_to, from_hf=hf_from,
)

SPEC = MixerSpec(Mamba2Config, Mamba2, hf=HF)
