"""Gated DeltaProduct mixer, docs/layers.md section 10 (Siems et al., DeltaProduct; fla
`GatedDeltaProduct`): every token takes n_h = `num_householder` steps of the Gated DeltaNet
update, each with its own key, value and write strength, the decay applied at the first:

    S_{t,0} = S_{t-1};  S_{t,j} = a_{t,j} S_{t,j-1} (I - beta_{t,j} k_{t,j} k_{t,j}^T) + beta_{t,j} v_{t,j} k_{t,j}^T,
    a_{t,1} = alpha_t (GDN's gate), a_{t,j>1} = 1;  S_t = S_{t,n_h};  o_t = S_t q_t / sqrt(d_k).

The transition of a token is a product of n_h generalised Householder matrices: with negative
eigenvalues (beta in (0, 2), on by default as in fla) it can be a rotation, which one step per
token cannot, hence state tracking (permutations, modular counting) that Gated DeltaNet lacks.
n_h = 1 is exactly Gated DeltaNet.

Computation: time is expanded to T * n_h steps (token t's step j at t * n_h + j - 1) and the
chunked gated delta rule runs on it with g at each token's first step (0 elsewhere) and q at its
last step (zeros elsewhere); every n_h-th output is kept. Packed documents use cu_seqlens * n_h;
a decode step of T tokens is an expansion of T * n_h steps from the cached state.

Layout: k_proj, v_proj, b_proj and the k/v short convolutions store their n_h-times-wide rows
head-major, [step_1 | ... | step_n_h] inside each head (fla stores them step-major, [head_1 |
... | head_H] inside each step: the Hugging Face format below permutes the rows). A
contiguous slice of whole heads is then the same mixer with fewer heads, so tensor parallelism
splits these colwise like every other per-head projection (DELTA_RULE_TP_PLAN)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field
from torch import Tensor

from models.hf.fla_layout import DECAY_PARAMS, DELTA_RULE_PARAMS, check_fla_model, ebb_model_section, fla_model_entries, fla_names
from models.hf.names import block_index
from models.layers.delta_rule import GatedDeltaRuleConfig, GatedDeltaRuleMixer
from models.layers.flops import chunked_recurrence_flops, projection_flops
from models.ops import chunk_gated_delta_rule
from models.spec import HFNative, MixerConfig, MixerSpec

if TYPE_CHECKING:
    from models.config import ModelConfig


class GatedDeltaProductConfig(GatedDeltaRuleConfig, MixerConfig):
    num_householder: int = Field(2, gt=0, description="n_h: Householder steps (keys, values, betas) per token")
    allow_neg_eigval: bool = Field(True, description="beta in (0, 2): each step's eigenvalues in [-1, 1]")

    def check_shapes(self, d_model: int) -> None:
        if self.expand_v * self.head_dim != int(self.expand_v * self.head_dim):
            raise ValueError(
                f"mixers.gated_deltaproduct.expand_v ({self.expand_v}) times head_dim ({self.head_dim}) "
                "must be a whole number"
            )

    def tp_divides(self, d_model: int) -> dict[str, int]:
        """num_v_heads is a multiple of num_heads, so it divides too."""
        return {"mixers.gated_deltaproduct.num_heads": self.num_heads}


def chunk_gated_delta_product(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """The gated delta product through the chunked gated delta rule on the expanded sequence.

    q [B, T, H, K], k [B, T, n_h, H, K], v [B, T, n_h, H, V], g [B, T, H], beta [B, T, n_h, H];
    returns o [B, T, H, V] and the final state [N, H, K, V] (fla's layouts otherwise).
    """
    B, T, n = k.shape[:3]
    # token t's steps sit at t * n + j: the read after the last step, the decay at the first
    q_steps = torch.cat([q.new_zeros(B, T, n - 1, *q.shape[2:]), q[:, :, None]], dim=2)
    g_steps = torch.cat([g[:, :, None], g.new_zeros(B, T, n - 1, *g.shape[2:])], dim=2)
    o, state = chunk_gated_delta_rule(
        q_steps.flatten(1, 2), k.flatten(1, 2), v.flatten(1, 2), g_steps.flatten(1, 2), beta.flatten(1, 2),
        scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens * n, chunk_size=chunk_size,
    )
    return o.unflatten(1, (T, n))[:, :, -1], state


class GatedDeltaProduct(GatedDeltaRuleMixer):
    """Gated DeltaNet's projections, gates and output (DeltaRuleMixer), with n_h keys, values
    and betas per token (head-major, see the module docs) and the product op above."""

    op = staticmethod(chunk_gated_delta_product)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        c = cfg.mixers.gated_deltaproduct
        super().__init__(cfg, c, layer_idx, steps=c.num_householder)
        self.num_householder = c.num_householder

    def recurrence_inputs(
        self, x: Tensor, cu_seqlens: Tensor | None = None, cache: dict | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """q [B, T, H_v, K], k [B, T, n_h, H_v, K] (q/k repeated to the value heads), v
        [B, T, n_h, H_v, V], g = log alpha [B, T, H_v] and beta [B, T, n_h, H_v]. Head counts
        are read from the projections' widths: under tensor parallelism they are this rank's."""
        n = self.num_householder
        q, k, v = self.qkv(x, cu_seqlens, cache)  # k, v [B, T, heads * n_h, D], head-major
        k, v = (t.unflatten(2, (-1, n)).transpose(2, 3) for t in (k, v))
        group = self.num_v_heads // self.num_heads
        q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=3)
        g, beta = self.gates(x)
        return q, k, v, g, beta.unflatten(-1, (-1, n)).transpose(-1, -2)

    def flops_per_token(self, seq_len: int) -> float:
        """Projections and convs, plus the chunked gated delta rule on n_h steps per token."""
        n = self.num_householder
        chunk = min(self.chunk_size, n * seq_len)
        core = chunked_recurrence_flops(chunk, self.head_k_dim, self.head_v_dim, delta_rule=True)
        return projection_flops(self) + n * self.num_v_heads * core


# --- Hugging Face: a Gated DeltaProduct model (alone or with attention blocks) is fla's
# GatedDeltaProductForCausalLM, its n_h-wide rows step-major (see the module docs) -----------------

HF_NAMES = fla_names(DELTA_RULE_PARAMS + DECAY_PARAMS)


def _row_width(model: ModelConfig, name: str) -> int | None:
    """The width of one head's step in the rows of `name` where they are n_h-wide, else None."""
    i = block_index(name)
    if i is None or model.blocks[i] != "P":
        return None
    c = model.mixers.gated_deltaproduct
    head_v_dim = int(c.expand_v * c.head_dim)
    return {"k_proj.weight": c.head_dim, "k_conv1d.weight": c.head_dim, "v_proj.weight": head_v_dim, "v_conv1d.weight": head_v_dim,
            "b_proj.weight": 1}.get(name.split(".mixer.", 1)[-1])


def _permute_steps(model: ModelConfig, name: str, tensor: Tensor, head_major: bool) -> Tensor:
    """Rows (h, n, d) -> (n, h, d) (to fla's step-major), or back with `head_major`."""
    width = _row_width(model, name)
    if width is None:
        return tensor
    n = model.mixers.gated_deltaproduct.num_householder
    rows = (n, -1, width) if head_major else (-1, n, width)
    return tensor.unflatten(0, rows).transpose(0, 1).flatten(0, 2).contiguous()


def hf_architecture(model: ModelConfig) -> str:
    c = model.mixers.gated_deltaproduct
    check_fla_model(model, "gated_deltaproduct", c.norm_eps, c.use_short_conv)
    if c.num_v_heads not in (None, c.num_heads):
        raise ValueError("mixers.gated_deltaproduct.num_v_heads differs from num_heads: fla's GatedDeltaProduct model has no value-head grouping")
    return "GatedDeltaProductForCausalLM"


def hf_config(model: ModelConfig) -> dict[str, Any]:
    c = model.mixers.gated_deltaproduct
    return fla_model_entries(model) | {
        "num_heads": c.num_heads, "head_dim": c.head_dim, "expand_v": c.expand_v, "num_householder": c.num_householder,
        "use_output_gate": True, "use_forget_gate": True, "conv_size": c.conv_size, "allow_neg_eigval": c.allow_neg_eigval,
    }


def hf_model_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The ebb `model` section of an fla GatedDeltaProduct config (fla's defaults where a key is missing)."""
    if not hf.get("use_output_gate", True):
        raise ValueError("use_output_gate: false: ebb's Gated DeltaProduct gates its output norm")
    if not hf.get("use_forget_gate", False):
        raise ValueError("use_forget_gate: false (fla's default): ebb's Gated DeltaProduct always decays its state")
    mixer = {
        "num_heads": hf.get("num_heads", 6), "head_dim": hf.get("head_dim", 256), "expand_v": hf.get("expand_v", 2.0),
        "num_householder": hf.get("num_householder", 1), "allow_neg_eigval": bool(hf.get("allow_neg_eigval", False)),
    }
    return ebb_model_section(hf, "P", "gated_deltaproduct", 21, mixer)


HF = HFNative(
    architectures=("GatedDeltaProductForCausalLM",), architecture=hf_architecture, config=hf_config,
    model_config=hf_model_config, names=HF_NAMES, model_type="gated_deltaproduct", hybrid_with=("attention",),
    to_hf=lambda model, name, tensor: _permute_steps(model, name, tensor, head_major=False),
    from_hf=lambda model, name, tensor: _permute_steps(model, name, tensor, head_major=True),
)

SPEC = MixerSpec(GatedDeltaProductConfig, GatedDeltaProduct, hf=HF)
