"""Token routing for the sparse-memory mixers (MoM, SSE): top-k choices of a softmax router, and
the varlen layout that runs every (memory, document) token stream as one segment of a single
chunked-op call.

A "route" is one (token, memory) pair. Routes are sorted by (memory, document, position), so each
memory's routes are contiguous (per-memory projections are one matmul per memory) and each
(memory, document) stream is one segment of `cu_seqlens` (the op resets its state there; many
short segments share chunks). An optional dense memory (MoM's shared memory, SSE's dense state)
is one more memory that every token is routed to with weight 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.context import active_piece


@dataclass(frozen=True)
class Routes:
    token: Tensor  # [R]: flat token index of each route, sorted by (memory, document, position)
    weight: Tensor  # [R]: the routing weight its read-out is multiplied by
    cu_seqlens: Tensor  # [memories * documents + 1]: segment (memory, document) bounds over routes
    per_memory: list[int]  # routes of each memory (contiguous, in memory order)

    def gather(self, x: Tensor) -> Tensor:
        """[N, ...] per token -> [R, ...] per route."""
        return x.index_select(0, self.token)

    def combine(self, o: Tensor, n_tokens: int) -> Tensor:
        """[R, ...] read-outs -> [N, ...]: each token's routing-weighted sum over its memories."""
        weighted = o * self.weight.to(o.dtype).view(-1, *([1] * (o.dim() - 1)))
        return o.new_zeros(n_tokens, *o.shape[1:]).index_add(0, self.token, weighted)


class TopKRouter(nn.Linear):
    """A softmax router (no bias) choosing each token's k most probable memories. A module, so
    that tensor parallelism can replicate it and sum the gradient of the chosen probabilities,
    which weight read-outs of each rank's own heads (parallel/tp/)."""

    def __init__(self, d_model: int, n_memories: int, k: int):
        super().__init__(d_model, n_memories, bias=False)
        self.k = k

    def forward(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The softmax probabilities [N, M] (float32 at least), the chosen memories [N, k] and
        their probabilities [N, k]."""
        dtype = torch.promote_types(flat.dtype, torch.float32)
        with torch.autocast(flat.device.type, enabled=False):  # autocast would run the matmul in bf16
            probs = F.linear(flat.to(dtype), self.weight.to(dtype)).softmax(-1)
        chosen = probs.topk(self.k, dim=-1).indices
        return probs, chosen, probs.gather(1, chosen)


def build_routes(
    chosen: Tensor,
    weights: Tensor,
    documents: Tensor,
    n_documents: int,
    n_memories: int,
    dense: bool,
    keep_last: Tensor | None = None,
) -> Routes:
    """Routes from each token's chosen memories [N, k] and their weights [N, k]; with `dense`,
    memory index n_memories also takes every token with weight 1. `keep_last` [memories *
    documents] keeps only the last that many routes of each (memory, document) segment."""
    N = chosen.shape[0]
    if dense:
        chosen = torch.cat([chosen, chosen.new_full((N, 1), n_memories)], dim=1)
        weights = torch.cat([weights, weights.new_ones(N, 1)], dim=1)
    memories = n_memories + int(dense)
    token = torch.arange(N, device=chosen.device).repeat_interleave(chosen.shape[1])
    memory, weight = chosen.flatten(), weights.flatten()
    segment = memory * n_documents + documents[token]
    segment, order = torch.sort(segment, stable=True)  # stable: positions stay in order
    token, memory, weight = token[order], memory[order], weight[order]
    if keep_last is not None:
        ends = segment_bounds(segment, memories * n_documents)[1:]
        kept = ends[segment] - torch.arange(segment.numel(), device=segment.device) <= keep_last[segment]
        segment, token, memory, weight = segment[kept], token[kept], memory[kept], weight[kept]
    per_memory = torch.bincount(memory, minlength=memories).tolist()
    return Routes(token, weight, segment_bounds(segment, memories * n_documents), per_memory)


def segment_bounds(segment: Tensor, n_segments: int) -> Tensor:
    """cu_seqlens [n_segments + 1] of sorted segment ids (empty segments included)."""
    counts = torch.bincount(segment, minlength=n_segments)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def switch_aux_loss(probs: Tensor, chosen: Tensor, n_memories: int) -> Tensor:
    """Switch-Transformer balance loss M * sum_m f_m P_m: f_m the fraction of tokens routed to m
    (each token counted once per choice, so sum_m f_m = k), P_m the mean router probability
    [N, M]. Its minimum, k, is at uniform routing (f_m = k/M, P_m = 1/M). Under context
    parallelism f and P are over the whole batch: each rank returns its piece's share,
    M sum_m f_m (its probabilities' sum)_m / N, and the shares sum to the whole batch's loss (as
    the ranks' LM losses do) with exact gradients; only the counts behind f, which have no
    gradient, are gathered, so the backward exchanges nothing."""
    counts = torch.bincount(chosen.flatten(), minlength=n_memories).to(probs.dtype)
    n_tokens = chosen.shape[0]
    piece = active_piece()
    if piece is not None:
        counts, n_tokens = piece.all_gather(counts).sum(0), n_tokens * piece.comm.size
    return n_memories * (counts * probs.sum(0)).sum() / n_tokens**2
