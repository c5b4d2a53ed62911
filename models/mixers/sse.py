"""Sparse State Expansion (SSE, arXiv 2507.16577), SSEGDN form, docs/layers.md section 6: a
dense Gated DeltaNet state plus N state partitions with shared parameters, each token writing to
and reading from its top-k partitions."""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from models.layers.conv import ShortConv, conv_features
from models.layers.flops import chunked_recurrence_flops, projection_flops
from models.layers.fused import store_head_major_
from models.layers.gates import GatedDecayConfig, beta_of, log_decay
from models.layers.init import init_decay_, init_normal_, residual_scale
from models.layers.norms import GatedRMSNorm, l2_norm
from models.layers.recurrence import ChunkOp, cached_recurrence
from models.layers.routing import TopKRouter, build_routes, switch_aux_loss
from models.ops import chunk_gated_delta_rule
from models.packing import as_one_sequence, documents_of_tokens
from models.spec import ContextParallelPlan, Mixer, MixerConfig, MixerSpec, TensorParallelPlan

if TYPE_CHECKING:
    from models.config import ModelConfig


class Stream(NamedTuple):
    """Per-token inputs of one state stream, flat over tokens: q, k [N, H, d_k]; g, beta [N, H]."""

    q: Tensor
    k: Tensor
    g: Tensor
    beta: Tensor


class SSEConfig(GatedDecayConfig, MixerConfig):
    """Sparse State Expansion, SSEGDN form (docs/layers.md section 6)."""

    num_partitions: int = Field(4, gt=0)
    topk: int = Field(1, gt=0, description="partitions each token writes to and reads from")
    num_heads: int = Field(4, gt=0)
    head_dim: int = Field(64, gt=0)
    expand_v: float = Field(2.0, gt=0)
    lora_rank: int | None = Field(None, gt=0, description="rank of the partition stream's q/k offsets; None = head_v_dim")
    use_short_conv: bool = False
    conv_size: int = Field(4, gt=1)
    impl: Literal["varlen", "mask"] = Field("varlen", description="varlen: routed tokens as segments; mask: N+1 masked head copies")
    aux_loss_scale: float = Field(0.01, ge=0)

    @model_validator(mode="after")
    def _topk(self) -> "SSEConfig":
        if self.topk > self.num_partitions:
            raise ValueError(f"topk ({self.topk}) must be <= num_partitions ({self.num_partitions})")
        return self

    def tp_divides(self, d_model: int) -> dict[str, int]:
        return {"mixers.sse.num_heads": self.num_heads}


class SSE(Mixer):
    """Dense stream: GDN on (q1, k1, v, alpha0, beta0), q1 = W_q x, k1 = W_k x. Partition stream:
    q2 = q1 + LoRA_q(x), k2 = k1 + LoRA_k(x), gates alpha1, beta1 (a_proj and b_proj give 2H,
    stored head-major: [dense_h, partition_h] for each head h, as are A_log and dt_bias); partition n is advanced only on the tokens whose top-k
    router choices e_t = softmax(W_e x_t) include n. q, k, v pass through SiLU and q, k are
    l2-normalised; an optional short convolution (no activation) acts on q1, k1.

    Routing weight (ebb differs from the reference here, docs/layers.md 9b): the reference scales
    q2 and k2 by e_tn before the l2 norm, which cancels it, so W_e learns only from the aux loss.
    Here the partitions see the normalised q2, k2 unscaled and each partition's read-out is
    multiplied by e_tn afterwards:
        o_t = S0_t q1/sqrt(d_k) + sum_{n in top-k} e_tn S^n_t q2/sqrt(d_k),
    so the language-model loss reaches W_e. Then the gated RMSNorm (low-rank g_proj) and out_proj.

    Two computations of the same result (`impl`): "varlen" runs every (partition, document)
    token stream and the dense stream as segments of one chunked call (the routed work only);
    "mask" runs N+1 head copies with q, k, v, g, beta zeroed where a partition is not selected
    (N+1 times the dense work; a reference). Aux loss (docs/layers.md 6b), added to carry["aux_loss"]:
    aux_loss_scale * N/k sum_n mean_t(e_tn) mean_t(selected_tn).
    """

    op: ClassVar[ChunkOp] = staticmethod(chunk_gated_delta_rule)
    tp_plan = TensorParallelPlan(
        colwise=("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "q_lora.1", "k_lora.1", "g_proj.1"),
        sharded={"q_conv1d": ("weight", "bias"), "k_conv1d": ("weight", "bias"), "v_conv1d": ("weight", "bias"), "": ("A_log", "dt_bias")},
        replicated={"q_lora.0": ("weight",), "k_lora.0": ("weight",), "g_proj.0": ("weight",)},
        summed={"o_norm": ("weight",)},
        routers=("router",),
    )
    cp_plan = ContextParallelPlan(transition="matrix", conv="conv_size")  # the dense state and each partition, per row
    """By head: a_proj, b_proj, A_log and dt_bias (2H, stored head-major, [dense_h, partition_h]
    per head) split so that each rank keeps both gates of its heads; the low-rank factors' first
    matrices (model width -> rank) replicated, their second colwise. The router as in MoM."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        c = cfg.mixers.sse
        self.cfg, self.layer_idx = c, layer_idx
        self.init_std, self.out_scale = cfg.init_std, residual_scale(cfg)
        d, H = cfg.d_model, c.num_heads
        self.head_k_dim, self.head_v_dim = c.head_dim, int(c.expand_v * c.head_dim)
        key_dim, value_dim = H * self.head_k_dim, H * self.head_v_dim
        rank = c.lora_rank or self.head_v_dim
        self.q_proj = nn.Linear(d, key_dim, bias=False)
        self.k_proj = nn.Linear(d, key_dim, bias=False)
        self.v_proj = nn.Linear(d, value_dim, bias=False)
        self.q_lora = nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, key_dim, bias=False))
        self.k_lora = nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, key_dim, bias=False))
        self.q_conv1d, self.k_conv1d = (
            ShortConv(key_dim, c.conv_size, activation=False) if c.use_short_conv else None for _ in range(2)
        )
        self.a_proj = nn.Linear(d, 2 * H, bias=False)
        self.b_proj = nn.Linear(d, 2 * H, bias=False)
        self.A_log = nn.Parameter(torch.empty(2 * H))
        self.dt_bias = nn.Parameter(torch.empty(2 * H))
        self.router = TopKRouter(d, c.num_partitions, c.topk)
        self.g_proj = nn.Sequential(nn.Linear(d, self.head_v_dim, bias=False), nn.Linear(self.head_v_dim, value_dim, bias=False))
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=c.norm_eps)
        self.out_proj = nn.Linear(value_dim, d, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fla/GDN defaults: Linear and conv ~ N(0, init_std), out_proj also / sqrt(residual
        branches); A ~ U(0, 16), dt_bias as Mamba2, for both the dense and the partition gates."""
        c = self.cfg
        init_normal_(self, self.init_std)
        self.out_proj.weight.mul_(self.out_scale)
        self.o_norm.reset_parameters()
        init_decay_(self.A_log, self.dt_bias, c.A_init_range, c.dt_min, c.dt_max, c.dt_init_floor)
        for gate in (self.a_proj.weight, self.b_proj.weight, self.A_log, self.dt_bias):
            store_head_major_(gate, [c.num_heads, c.num_heads], c.num_heads)

    def streams(self, x: Tensor, cu_seqlens: Tensor | None, cache: dict | None) -> tuple[Stream, Stream, Tensor]:
        """The dense and partition streams' inputs and the shared v [N, H, d_v], flat over tokens
        (H: the heads this module holds)."""
        q1, k1 = self.q_proj(x), self.k_proj(x)
        if self.q_conv1d is not None:
            q1 = conv_features(self.q_conv1d, q1, cu_seqlens, cache, "conv_q")
            k1 = conv_features(self.k_conv1d, k1, cu_seqlens, cache, "conv_k")
        q2, k2 = q1 + self.q_lora(x), k1 + self.k_lora(x)
        q1, k1, q2, k2 = (l2_norm(F.silu(t).flatten(0, 1).unflatten(-1, (-1, self.head_k_dim))) for t in (q1, k1, q2, k2))
        v = F.silu(self.v_proj(x)).flatten(0, 1).unflatten(-1, (-1, self.head_v_dim))
        g0, g1 = log_decay(self.a_proj(x), self.A_log, self.dt_bias).flatten(0, 1).unflatten(-1, (-1, 2)).unbind(-1)
        beta0, beta1 = beta_of(self.b_proj(x)).flatten(0, 1).unflatten(-1, (-1, 2)).unbind(-1)
        return Stream(q1, k1, g0, beta0), Stream(q2, k2, g1, beta1), v

    @property
    def carry_writes(self) -> tuple[str, ...]:
        """What forward adds to the carry dict (pipeline stages ship exactly these)."""
        return ("aux_loss",) if self.cfg.aux_loss_scale else ()

    def forward(
        self, x: Tensor, cu_seqlens: Tensor | None = None, cache: dict | None = None, carry: dict | None = None
    ) -> Tensor:
        B, T, _ = x.shape
        seq = as_one_sequence(x, cu_seqlens, cache)
        flat = x.reshape(B * T, -1)
        dense, partition, v = self.streams(seq, cu_seqlens, cache)
        probs, chosen, weights = self.router(flat)  # weights: not renormalised
        if self.cfg.impl == "varlen":
            documents, n_documents = documents_of_tokens(B, T, cu_seqlens, x.device)
            o = self.varlen_readout(dense, partition, v, chosen, weights, documents, n_documents, cache)
        else:
            o = self.masked_readout(dense, partition, v, chosen, weights, seq.shape[:2], cu_seqlens, cache)
        o = self.o_norm(o, self.g_proj(flat).unflatten(-1, (-1, self.head_v_dim)))
        if carry is not None and self.cfg.aux_loss_scale:
            balance = switch_aux_loss(probs, chosen, self.cfg.num_partitions) / self.cfg.topk
            carry["aux_loss"] = carry.get("aux_loss", 0.0) + self.cfg.aux_loss_scale * balance
        return self.out_proj(o.reshape(B, T, -1))

    def core(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, cu_seqlens: Tensor | None, cache: dict | None) -> Tensor:
        return cached_recurrence(
            self.op, q, k, v, g, beta,
            scale=self.head_k_dim**-0.5, chunk_size=self.cfg.chunk_size, cu_seqlens=cu_seqlens, cache=cache,
            transition=self.cp_plan.transition,
        )

    def varlen_readout(
        self, dense: Stream, partition: Stream, v: Tensor, chosen: Tensor, weights: Tensor,
        documents: Tensor, n_documents: int, cache: dict | None,
    ) -> Tensor:
        """Partitions 0..P-1 and the dense state (memory P) as (memory, document) segments of one
        chunked call; the cache holds one state per (memory, batch row)."""
        routes = build_routes(chosen, weights, documents, n_documents, self.cfg.num_partitions, dense=True)
        to_partitions, to_dense = routes.token.split([routes.token.numel() - routes.per_memory[-1], routes.per_memory[-1]])
        q, k, g, beta = (
            torch.cat([p.index_select(0, to_partitions), d.index_select(0, to_dense)]) for p, d in zip(partition, dense)
        )
        o = self.core(q[None], k[None], routes.gather(v)[None], g[None], beta[None], routes.cu_seqlens, cache)
        return routes.combine(o[0], documents.numel())

    def masked_readout(
        self, dense: Stream, partition: Stream, v: Tensor, chosen: Tensor, weights: Tensor,
        shape: torch.Size, cu_seqlens: Tensor | None, cache: dict | None,
    ) -> Tensor:
        """P+1 head copies (partitions, then dense) in one chunked call: a partition's q, k, v, g,
        beta are zero where it is not selected, so its state neither decays nor changes there."""
        n_tokens, P = chosen.shape[0], self.cfg.num_partitions
        selected = torch.zeros(n_tokens, P, dtype=v.dtype, device=v.device).scatter(1, chosen, 1.0)

        def copies(part: Tensor, whole: Tensor) -> Tensor:
            mask = selected.view(n_tokens, P, *([1] * (part.dim() - 1)))
            heads = torch.cat([part.unsqueeze(1) * mask, whole.unsqueeze(1)], dim=1).flatten(1, 2)
            return heads.unflatten(0, tuple(shape))

        inputs = [copies(p, d) for p, d in zip(partition, dense)]
        o = self.core(*inputs[:2], copies(v, v), *inputs[2:], cu_seqlens, cache)
        o = o.flatten(0, 1).unflatten(1, (P + 1, -1))
        read = torch.zeros(n_tokens, P, dtype=o.dtype, device=o.device).scatter(1, chosen, weights.to(o.dtype))
        read = torch.cat([read, read.new_ones(n_tokens, 1)], dim=1)
        return (o * read[..., None, None]).sum(1)

    def flops_per_token(self, seq_len: int) -> float:
        """Every projection (LoRAs, router, low-rank gate included) and, per head, the chunked
        recurrence of the dense state and of the k selected partitions (the routed work)."""
        c = self.cfg
        core = chunked_recurrence_flops(min(c.chunk_size, seq_len), self.head_k_dim, self.head_v_dim, delta_rule=True)
        return projection_flops(self) + (1 + c.topk) * c.num_heads * core


SPEC = MixerSpec(SSEConfig, SSE)
