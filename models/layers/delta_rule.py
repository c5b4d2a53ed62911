"""What the delta-rule mixers share (DeltaNet, Gated DeltaNet, Gated DeltaProduct): q, k, v
projections with short convolutions, the chunked op, the per-head output norm, and how tensor
parallelism splits them."""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from models.layers.conv import ShortConv, conv_features
from models.layers.flops import chunked_recurrence_flops, projection_flops
from models.layers.gates import GatedDecayConfig, beta_of, log_decay, write_strength
from models.layers.init import init_decay_, init_normal_, residual_scale
from models.layers.norms import GatedRMSNorm, RMSNorm, l2_norm
from models.layers.recurrence import ChunkOp, cached_recurrence
from models.packing import as_one_sequence
from models.spec import ContextParallelPlan, Mixer, TensorParallelPlan

if TYPE_CHECKING:
    from models.config import ModelConfig

DELTA_RULE_TP_PLAN = TensorParallelPlan(
    colwise=("q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj"),
    sharded={"q_conv1d": ("weight", "bias"), "k_conv1d": ("weight", "bias"), "v_conv1d": ("weight", "bias"), "": ("A_log", "dt_bias")},
    summed={"o_norm": ("weight",)},
)
"""By head: the projections colwise, the short convs by channel, A_log and dt_bias by head. The
output norm's weight is one head's width, shared by all heads: replicated, its gradient summed.
With GVA each rank holds num_heads/tp q/k heads and the num_v_heads/tp value heads they serve."""


class DeltaRuleMixer(Mixer):
    """What the delta-rule mixers share: q, k, v projections (no bias), each followed by a short
    convolution and SiLU, q and k l2-normalised per head; the chunked op (`op`, fed by the
    subclass's `recurrence_inputs`); the output RMSNorm per value head (gated by g_proj(x) when
    `use_gate`) and out_proj. With `steps` > 1 each token has that many keys and values (Gated
    DeltaProduct), stored head-major: [step_1 | ... | step_n] inside each head. Subclasses add
    their gates and call reset_parameters() last."""

    op: ClassVar[ChunkOp]
    tp_plan = DELTA_RULE_TP_PLAN
    cp_plan = ContextParallelPlan(transition="matrix", conv="conv_size")  # (I - beta k k^T) per step, times the gate

    def __init__(
        self,
        cfg: ModelConfig,
        heads: int,
        v_heads: int,
        head_k_dim: int,
        head_v_dim: int,
        use_short_conv: bool,
        conv_size: int,
        use_gate: bool,
        norm_eps: float,
        chunk_size: int,
        steps: int = 1,
    ):
        super().__init__()
        d = cfg.d_model
        self.init_std = cfg.init_std
        self.out_scale = residual_scale(cfg)
        self.num_heads, self.num_v_heads = heads, v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.chunk_size = chunk_size
        key_dim, value_dim = heads * head_k_dim, v_heads * head_v_dim
        self.q_proj = nn.Linear(d, key_dim, bias=False)
        self.k_proj = nn.Linear(d, steps * key_dim, bias=False)
        self.v_proj = nn.Linear(d, steps * value_dim, bias=False)
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (
            ShortConv(width, conv_size) if use_short_conv else None for width in (key_dim, steps * key_dim, steps * value_dim)
        )
        self.g_proj = nn.Linear(d, value_dim, bias=False) if use_gate else None
        self.o_norm = GatedRMSNorm(head_v_dim, eps=norm_eps) if use_gate else RMSNorm(head_v_dim, eps=norm_eps)
        self.out_proj = nn.Linear(value_dim, d, bias=False)

    def reset_parameters(self) -> None:
        """fla: every Linear and conv ~ N(0, init_std); out_proj also / sqrt(residual branches)."""
        init_normal_(self, self.init_std)
        self.o_norm.reset_parameters()
        with torch.no_grad():
            self.out_proj.weight.mul_(self.out_scale)

    def qkv(self, x: Tensor, cu_seqlens: Tensor | None, cache: dict | None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k [B, T, H, d_k] (unit norm), v [B, T, H_v, d_v]."""
        q = conv_features(self.q_conv1d, self.q_proj(x), cu_seqlens, cache, "conv_q")
        k = conv_features(self.k_conv1d, self.k_proj(x), cu_seqlens, cache, "conv_k")
        v = conv_features(self.v_conv1d, self.v_proj(x), cu_seqlens, cache, "conv_v")
        q, k = (l2_norm(t.unflatten(-1, (-1, self.head_k_dim))) for t in (q, k))
        return q, k, v.unflatten(-1, (-1, self.head_v_dim))

    def recurrence_inputs(
        self, x: Tensor, cu_seqlens: Tensor | None = None, cache: dict | None = None
    ) -> tuple[Tensor, ...]:
        """The positional inputs of `op`: q, k, v, then beta (DeltaNet) or g, beta (GDN)."""
        raise NotImplementedError

    def forward(
        self, x: Tensor, cu_seqlens: Tensor | None = None, cache: dict | None = None, carry: dict | None = None
    ) -> Tensor:
        flat = as_one_sequence(x, cu_seqlens, cache)
        o = cached_recurrence(
            self.op, *self.recurrence_inputs(flat, cu_seqlens, cache),
            scale=self.head_k_dim**-0.5, chunk_size=self.chunk_size, cu_seqlens=cu_seqlens, cache=cache,
            transition=self.cp_plan.transition,
        )
        if self.g_proj is None:
            o = self.o_norm(o)
        else:
            o = self.o_norm(o, self.g_proj(flat).unflatten(-1, (-1, self.head_v_dim)))
        return self.out_proj(o.reshape(*x.shape[:-1], -1))

    def flops_per_token(self, seq_len: int) -> float:
        chunk = min(self.chunk_size, seq_len)
        core = chunked_recurrence_flops(chunk, self.head_k_dim, self.head_v_dim, delta_rule=True)
        return projection_flops(self) + self.num_v_heads * core


class GatedDeltaRuleConfig(GatedDecayConfig):
    """The options of a Gated DeltaNet layer (docs/layers.md section 3), which Gated DeltaProduct
    extends."""

    num_heads: int = Field(4, gt=0, description="query/key heads")
    num_v_heads: int | None = Field(None, gt=0, description="value heads (GVA); a multiple of num_heads")
    head_dim: int = Field(64, gt=0)
    expand_v: float = Field(2.0, gt=0)
    use_short_conv: bool = True
    conv_size: int = Field(4, gt=0)
    allow_neg_eigval: bool = False

    @model_validator(mode="after")
    def _gva(self) -> GatedDeltaRuleConfig:
        if self.num_v_heads is not None and self.num_v_heads % self.num_heads:
            raise ValueError(f"num_v_heads ({self.num_v_heads}) must be a multiple of num_heads ({self.num_heads})")
        return self


class GatedDeltaRuleMixer(DeltaRuleMixer):
    """Gated DeltaNet's layer: the delta-rule base with the decay gate log alpha = -exp(A_log)
    softplus(a_proj(x) + dt_bias) per value head and `steps` write strengths beta per token and
    value head (b_proj, head-major)."""

    def __init__(self, cfg: ModelConfig, c: GatedDeltaRuleConfig, layer_idx: int, steps: int = 1):
        v_heads = c.num_v_heads or c.num_heads
        super().__init__(
            cfg, c.num_heads, v_heads, c.head_dim, int(c.expand_v * c.head_dim), c.use_short_conv, c.conv_size,
            use_gate=True, norm_eps=c.norm_eps, chunk_size=c.chunk_size, steps=steps,
        )
        self.cfg = c
        self.layer_idx = layer_idx
        self.a_proj = nn.Linear(cfg.d_model, v_heads, bias=False)
        self.b_proj = nn.Linear(cfg.d_model, v_heads * steps, bias=False)
        self.A_log = nn.Parameter(torch.empty(v_heads))
        self.dt_bias = nn.Parameter(torch.empty(v_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fla: Linear and conv ~ N(0, init_std); A ~ U(0, 16), dt_bias as Mamba2."""
        c = self.cfg
        super().reset_parameters()
        init_decay_(self.A_log, self.dt_bias, c.A_init_range, c.dt_min, c.dt_max, c.dt_init_floor)

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """g = log alpha [..., H_v] and beta [..., H_v * steps] (head-major)."""
        g = log_decay(self.a_proj(x), self.A_log, self.dt_bias)
        return g, write_strength(beta_of(self.b_proj(x)), self.cfg.allow_neg_eigval)
