"""Mixture-of-Memories (MoM, arXiv 2502.13685), docs/layers.md section 5: M Gated DeltaNet
memories, each token routed to its top-k by a softmax router, plus an optional shared memory that
sees every token."""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from models.context import active_piece
from models.layers.conv import ShortConv, segment_conv
from models.layers.flops import chunked_recurrence_flops
from models.layers.fused import split_groups, store_head_major_
from models.layers.gates import GatedDecayConfig, beta_of, log_decay, write_strength
from models.layers.init import init_decay_, residual_scale
from models.layers.norms import GatedRMSNorm, l2_norm
from models.layers.recurrence import ChunkOp, cached_recurrence
from models.layers.routing import Routes, TopKRouter, build_routes, switch_aux_loss
from models.ops import chunk_gated_delta_rule
from models.packing import check_not_decoding, documents_of_tokens
from models.spec import ContextParallelPlan, Mixer, MixerConfig, MixerSpec, TensorParallelPlan

if TYPE_CHECKING:
    from models.config import ModelConfig


class MoMConfig(GatedDecayConfig, MixerConfig):
    """Mixture-of-Memories (docs/layers.md section 5): Gated DeltaNet memories, top-k routed."""

    num_memories: int = Field(4, gt=0)
    topk: int = Field(2, gt=0)
    shared_memory: bool = Field(True, description="one more memory that sees every token")
    num_heads: int = Field(4, gt=0)
    head_dim: int = Field(64, gt=0)
    expand_v: float = Field(1.0, gt=0)
    capacity: float | None = Field(
        None, ge=0, description="each memory keeps the last ceil(capacity*L/topk) routed tokens of a document of L; None/0 = all"
    )
    aux_loss_scale: float = Field(0.01, ge=0)
    use_short_conv: bool = True
    conv_size: int = Field(4, gt=1)
    allow_neg_eigval: bool = False

    @model_validator(mode="after")
    def _topk(self) -> "MoMConfig":
        if self.topk > self.num_memories:
            raise ValueError(f"topk ({self.topk}) must be <= num_memories ({self.num_memories})")
        return self

    def tp_divides(self, d_model: int) -> dict[str, int]:
        return {"mixers.mom.num_heads": self.num_heads}


class MoM(Mixer):
    """p_t = softmax(W_r x_t) in fp32 (no bias); each token goes to its top-k memories with
    weights p renormalised over them. q_proj, A_log, dt_bias and the three short convolutions
    are shared; each memory m has its own k, v, b, a projection (`memories[m]`, fused and stored
    head-major, [k_h | v_h | b_h | a_h] for each head h; the shared memory is the last). Memory m is a Gated DeltaNet advanced only on the
    tokens routed to it: o_t = sum_{m in top-k} w_tm S^m_t q_t/sqrt(d_k) + S^shared_t q_t/sqrt(d_k),
    then the gated RMSNorm with g_proj(x) and out_proj.

    Every (memory, document) token stream is one segment of one `chunk_gated_delta_rule` call,
    and each memory's short convolution runs on that memory's own compacted stream within one
    document (ebb differs here from fla, whose training path leaks W-1 tokens across streams).

    `capacity` (training forwards, not decoding): of the tokens a document of L tokens routes to
    a memory, the memory keeps only the last ceil(capacity * L / topk) (the original `mom_naive`
    truncation); the dropped tokens get nothing from that memory and the remaining weights are
    not renormalised. It is non-causal (whether a token is kept depends on later routing), so
    decoding from a cache ignores it. None or 0: unlimited.

    Aux loss (Switch): aux_loss_scale * M sum_m f_m P_m, added to carry["aux_loss"] per layer
    (the reference pools the router logits of all layers into one such term).
    The decode cache holds one state and one conv tail per (memory, batch row); a memory's are
    advanced only when a token is routed to it.
    """

    op: ClassVar[ChunkOp] = staticmethod(chunk_gated_delta_rule)
    tp_plan = TensorParallelPlan(
        colwise=("q_proj", "g_proj", "memories.*"),
        sharded={"q_conv1d": ("weight", "bias"), "k_conv1d": ("weight", "bias"), "v_conv1d": ("weight", "bias"), "": ("A_log", "dt_bias")},
        summed={"o_norm": ("weight",)},
        routers=("router",),
    )
    cp_plan = ContextParallelPlan(transition="matrix")  # per (memory, row) stream; its conv tails come from any earlier piece
    """By head. The router reads the replicated input, so every rank routes every token the same
    way; its chosen probabilities weight read-outs of this rank's heads only. The auxiliary loss
    comes from the router's probabilities alone: identical on every rank and counted once."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        c = cfg.mixers.mom
        self.cfg, self.layer_idx = c, layer_idx
        self.out_scale = residual_scale(cfg)
        d, H = cfg.d_model, c.num_heads
        self.head_k_dim, self.head_v_dim = c.head_dim, int(c.expand_v * c.head_dim)
        self.key_dim, self.value_dim = H * self.head_k_dim, H * self.head_v_dim
        self.n_memories = c.num_memories + int(c.shared_memory)
        self.router = TopKRouter(d, c.num_memories, c.topk)
        self.q_proj = nn.Linear(d, self.key_dim, bias=False)
        self.memories = nn.ModuleList(
            nn.Linear(d, self.key_dim + self.value_dim + 2 * H, bias=False) for _ in range(self.n_memories)
        )
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (
            ShortConv(width, c.conv_size) if c.use_short_conv else None
            for width in (self.key_dim, self.key_dim, self.value_dim)
        )
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.g_proj = nn.Linear(d, self.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=c.norm_eps)
        self.out_proj = nn.Linear(self.value_dim, d, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """MoM: every Linear xavier_uniform(gain 2^-2.5) (out_proj also / sqrt(residual
        branches)); A ~ U(0, 16), dt_bias as Mamba2; convolutions as nn.Conv1d."""
        c = self.cfg
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, gain=2**-2.5)
            elif isinstance(m, ShortConv):
                m.reset_parameters()
        H = c.num_heads
        for memory in self.memories:
            store_head_major_(memory.weight, [self.key_dim, self.value_dim, H, H], H)
        self.out_proj.weight.mul_(self.out_scale)
        self.o_norm.reset_parameters()
        init_decay_(self.A_log, self.dt_bias, c.A_init_range, c.dt_min, c.dt_max, c.dt_init_floor)

    @property
    def carry_writes(self) -> tuple[str, ...]:
        """What forward adds to the carry dict (pipeline stages ship exactly these)."""
        return ("aux_loss",) if self.cfg.aux_loss_scale else ()

    def route(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router probabilities [N, M], the chosen memories [N, k] and their weights [N, k]
        (probabilities renormalised over the chosen)."""
        probs, chosen, chosen_probs = self.router(flat)
        return probs, chosen, chosen_probs / chosen_probs.sum(-1, keepdim=True)

    def capacity_limits(self, batch: int, length: int, cu_seqlens: Tensor | None, device: torch.device) -> Tensor | None:
        """Routes kept per (memory, document) segment, memory-major; the shared memory keeps all."""
        if not self.cfg.capacity:
            return None
        lengths = cu_seqlens.diff() if cu_seqlens is not None else torch.full((batch,), length, device=device)
        limits = torch.ceil(lengths * (self.cfg.capacity / self.cfg.topk)).long()
        shared = [lengths] if self.cfg.shared_memory else []
        return torch.cat([limits.repeat(self.cfg.num_memories), *shared])

    def forward(
        self, x: Tensor, cu_seqlens: Tensor | None = None, cache: dict | None = None, carry: dict | None = None
    ) -> Tensor:
        check_not_decoding(cu_seqlens, cache)
        B, T, _ = x.shape
        flat = x.reshape(B * T, -1)
        probs, chosen, weights = self.route(flat)
        documents, n_documents = documents_of_tokens(B, T, cu_seqlens, x.device)
        if self.cfg.capacity and active_piece() is not None:
            raise ValueError("mixers.mom.capacity keeps the last routed tokens of whole documents: it cannot run under context parallelism")
        keep_last = None if cache is not None else self.capacity_limits(B, T, cu_seqlens, x.device)
        routes = build_routes(
            chosen, weights, documents, n_documents, self.cfg.num_memories, self.cfg.shared_memory, keep_last
        )
        o = routes.combine(self.memory_readouts(flat, routes, cache), B * T)
        o = self.o_norm(o, self.g_proj(flat).unflatten(-1, (-1, self.head_v_dim)))
        if carry is not None and self.cfg.aux_loss_scale:
            aux = self.cfg.aux_loss_scale * switch_aux_loss(probs, chosen, self.cfg.num_memories)
            carry["aux_loss"] = carry.get("aux_loss", 0.0) + aux
        return self.out_proj(o.reshape(B, T, -1))

    def memory_readouts(self, flat: Tensor, routes: Routes, cache: dict | None) -> Tensor:
        """Each route's read-out S^m_t q_t / sqrt(d_k) [R, H, d_v], all memories in one op call
        (H: the heads this module holds)."""
        q = routes.gather(self.q_proj(flat))
        parts = routes.gather(flat).split(routes.per_memory)
        kvba = torch.cat([proj(part) for proj, part in zip(self.memories, parts)])
        k, v, b, a = split_groups(kvba, [self.head_k_dim, self.head_v_dim, 1, 1])
        q = self.stream_conv(self.q_conv1d, q, routes, cache, "conv_q")
        k = self.stream_conv(self.k_conv1d, k, routes, cache, "conv_k")
        v = self.stream_conv(self.v_conv1d, v, routes, cache, "conv_v")
        q, k = (l2_norm(t.unflatten(-1, (-1, self.head_k_dim))) for t in (q, k))
        g = log_decay(a, self.A_log, self.dt_bias)
        beta = write_strength(beta_of(b), self.cfg.allow_neg_eigval)
        o = cached_recurrence(
            self.op, q[None], k[None], v.unflatten(-1, (-1, self.head_v_dim))[None], g[None], beta[None],
            scale=self.head_k_dim**-0.5, chunk_size=self.cfg.chunk_size, cu_seqlens=routes.cu_seqlens, cache=cache,
            transition=self.cp_plan.transition,
        )
        return o[0]

    @staticmethod
    def stream_conv(conv: ShortConv | None, x: Tensor, routes: Routes, cache: dict | None, key: str) -> Tensor:
        """SiLU(ShortConv) on each (memory, document) stream, continuing from and updating the
        per-stream tails in `cache[key]`; SiLU alone without a convolution."""
        if conv is None:
            return F.silu(x)
        tails = None
        if cache is not None:
            n_streams = routes.cu_seqlens.numel() - 1
            tails = cache.get(key, x.new_zeros(n_streams, conv.kernel_size[0] - 1, x.shape[-1]))
        y, tails = segment_conv(conv, x, routes.cu_seqlens, tails)
        if cache is not None:
            cache[key] = tails
        return y

    def flops_per_token(self, seq_len: int) -> float:
        """Router, q, g and out projections for every token; per route (top-k, plus the shared
        memory) the memory's projection, the convolutions and the chunked recurrence."""
        c, d = self.cfg, self.router.in_features
        dense = 2.0 * d * (c.num_memories + self.key_dim + 2 * self.value_dim)
        conv = 2.0 * c.conv_size * (2 * self.key_dim + self.value_dim) if c.use_short_conv else 0.0
        core = c.num_heads * chunked_recurrence_flops(
            min(c.chunk_size, seq_len), self.head_k_dim, self.head_v_dim, delta_rule=True
        )
        per_route = 2.0 * self.memories[0].in_features * self.memories[0].out_features + conv + core
        return dense + (c.topk + int(c.shared_memory)) * per_route


SPEC = MixerSpec(MoMConfig, MoM)
