"""What the chunkwise-parallel ops share: the chunk layout of (packed) sequences, the
within-chunk gate sums, and the scan of the state over chunks.

Every sequence (a batch row, or a document of a packed batch) is padded at its end to a
multiple of the chunk with tokens that leave the state unchanged (k = v = beta = g = 0), and
all chunks are laid out one after another, so the intra-chunk work is one batched tensor op.
The chunks are stored "step-major": first the first chunk of every sequence, then the second
chunk of every sequence that has one, and so on, sequences sorted by their number of chunks
(longest first). Step j of the state scan is then one contiguous slice of that layout, and its
sequences are a prefix of the previous step's: the scan runs as many Python steps as the
longest sequence has chunks, however many short documents are packed beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from models.ops.recurrent import sequence_spans

StepFn = Callable[..., tuple[Tensor, tuple[Tensor, ...]]]


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (bf16/fp16 inputs included)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


@dataclass(frozen=True)
class ChunkLayout:
    chunk_size: int
    batch: int
    length: int
    token_of_slot: Tensor  # [n_chunks * chunk_size]: flat token index, n_tokens for padding
    slot_of_token: Tensor  # [n_tokens]: where each token sits in the chunk layout
    order: Tensor  # [N]: sequences by decreasing number of chunks
    active: list[int]  # sequences still running at each scan step

    @property
    def num_sequences(self) -> int:
        return self.order.numel()

    def to_chunks(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """[B, T, H, *D] -> [n_chunks, H, chunk_size, *D], padded with zeros."""
        flat = x.to(dtype).flatten(0, 1)
        flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])
        chunks = flat.index_select(0, self.token_of_slot)
        return chunks.unflatten(0, (-1, self.chunk_size)).transpose(1, 2).contiguous()

    def from_chunks(self, x: Tensor) -> Tensor:
        """[n_chunks, H, chunk_size, *D] -> [B, T, H, *D], padding dropped."""
        flat = x.transpose(1, 2).flatten(0, 1)
        return flat.index_select(0, self.slot_of_token).unflatten(0, (self.batch, self.length))


def chunk_layout(batch: int, length: int, cu_seqlens: Tensor | None, chunk_size: int, device: torch.device) -> ChunkLayout:
    if cu_seqlens is not None and (cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point()):
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    spans = sequence_spans(batch, length, cu_seqlens)
    starts = torch.tensor([b * length + s for b, s, _ in spans], device=device)
    lengths = torch.tensor([e - s for _, s, e in spans], device=device)
    chunks_per_sequence = (lengths + chunk_size - 1) // chunk_size
    order = torch.argsort(chunks_per_sequence, descending=True, stable=True)
    starts, lengths, chunks_per_sequence = starts[order], lengths[order], chunks_per_sequence[order]

    steps = torch.arange(int(chunks_per_sequence.max()), device=device)
    running = steps[:, None] < chunks_per_sequence[None, :]  # [steps, N], a prefix of N per step
    step_of_chunk = steps[:, None].expand_as(running)[running]
    rank_of_chunk = torch.arange(len(spans), device=device).expand_as(running)[running]
    offset = step_of_chunk[:, None] * chunk_size + torch.arange(chunk_size, device=device)
    n_tokens = batch * length
    token = torch.where(
        offset < lengths[rank_of_chunk, None], starts[rank_of_chunk, None] + offset, n_tokens
    ).flatten()
    slot = torch.empty(n_tokens + 1, dtype=torch.long, device=device)
    slot[token] = torch.arange(token.numel(), device=device)
    return ChunkLayout(
        chunk_size=chunk_size,
        batch=batch,
        length=length,
        token_of_slot=token,
        slot_of_token=slot[:n_tokens],
        order=order,
        active=running.sum(1).tolist(),
    )


@dataclass(frozen=True)
class ChunkGates:
    """Decays of a per-head scalar log-gate g inside each chunk (Gamma_i = g_1 + ... + g_i)."""

    within: Tensor  # [.., C, C]: exp(Gamma_i - Gamma_j) for j <= i, 0 above the diagonal
    from_start: Tensor  # [.., C]: exp(Gamma_i), the decay of the incoming state at token i
    to_end: Tensor  # [.., C]: exp(Gamma_C - Gamma_j), the decay of token j's write by the chunk end
    total: Tensor  # [..]: exp(Gamma_C), the decay of the incoming state over the whole chunk


def chunk_gates(g: Tensor) -> ChunkGates:
    """Segment sums in the stable masked-cumsum form: each one sums its own gates, so no two
    large prefix sums are subtracted."""
    C = g.shape[-1]
    ones = torch.ones(C, C, dtype=torch.bool, device=g.device)
    per_row = g[..., :, None].expand(*g.shape, C).masked_fill(~ones.tril(-1), 0)
    segment = per_row.cumsum(-2).masked_fill(~ones.tril(), float("-inf"))
    log_from_start = g.cumsum(-1)
    return ChunkGates(
        within=segment.exp(),
        from_start=log_from_start.exp(),
        to_end=segment[..., -1, :].exp(),
        total=log_from_start[..., -1].exp(),
    )


def scan_chunks(
    layout: ChunkLayout,
    initial_state: Tensor,
    per_chunk: Sequence[Tensor],
    step: StepFn,
) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
    """Runs `state, outputs = step(state, *chunk_inputs)` over the chunks of every sequence.

    `initial_state` is [N, H, K, V] in sequence order; `per_chunk` tensors are in chunk layout.
    Returns the state entering every chunk (chunk layout), each step output concatenated
    (chunk layout), and the final state of every sequence (sequence order).
    """
    per_step = [x.split(layout.active) for x in per_chunk]
    state = initial_state[layout.order]
    entering, outputs, finished = [], [], []
    for j, n_active in enumerate(layout.active):
        if n_active < state.shape[0]:
            finished.append(state[n_active:])
            state = state[:n_active]
        entering.append(state)
        state, out = step(state, *(x[j] for x in per_step))
        outputs.append(out)
    finished.append(state)
    final_sorted = torch.cat(finished[::-1])
    final = final_sorted[torch.argsort(layout.order)]
    return torch.cat(entering), tuple(torch.cat(o) for o in zip(*outputs)), final


def initial_or_zero(
    initial_state: Tensor | None, layout: ChunkLayout, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    N = layout.num_sequences
    if initial_state is None:
        return torch.zeros(N, *shape, dtype=dtype, device=device)
    if tuple(initial_state.shape) != (N, *shape):
        raise ValueError(f"initial_state must have shape {(N, *shape)} (one state per sequence), got {tuple(initial_state.shape)}")
    return initial_state.to(dtype)


def chunked_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    per_head: Sequence[Tensor],
    scale: float | None,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    chunk_size: int,
) -> tuple[ChunkLayout, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """The layout, the initial states and scale*q, k, v and the per-head gates in chunk layout."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    dtype = compute_dtype(q, k, v, initial_state, *per_head)
    layout = chunk_layout(B, T, cu_seqlens, chunk_size, q.device)
    state = initial_or_zero(initial_state, layout, (H, K, V), dtype, q.device)
    q, k, v, *per_head = (layout.to_chunks(x, dtype) for x in (q, k, v, *per_head))
    return layout, state, q * scale, k, v, per_head


def chunked_result(
    layout: ChunkLayout, o: Tensor, final_state: Tensor, like: Tensor, output_final_state: bool
) -> tuple[Tensor, Tensor | None]:
    return layout.from_chunks(o).to(like.dtype), final_state if output_final_state else None
