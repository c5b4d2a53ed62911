"""What the chunkwise-parallel ops share: the chunk layout of (packed) sequences, the
within-chunk gate sums, the scan of the state over chunks and the final states.

The tokens are cut into "units", each scanned from its own initial state: the batch rows; with
`cu_seqlens` and initial states, the documents; with `cu_seqlens` and no initial states, the
whole packed row, where every document start cuts its chunk into segments that nothing crosses
(see `chunk_gates`). Documents then share chunks: many short
documents cost what one long one does. Every unit is padded at its end to a multiple of the chunk
with tokens that leave the state unchanged (k = v = beta = g = 0).

Chunks are stored "step-major": the first chunk of every unit, then the second chunk of every unit
that has one, and so on, units sorted by their number of chunks (longest first). Step j of the
state scan is then one contiguous slice of the layout, and its units are a prefix of the previous
step's. The intra-chunk work is one batched tensor op over all chunks.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from models.ops.recurrent import sequence_spans

StepFn = Callable[..., tuple[Tensor, tuple[Tensor, ...]]]


def autocast_off(op: Callable) -> Callable:
    """Run a chunked op outside autocast: it computes in float32 (float64 for float64 inputs)
    whatever the caller's autocast, since bf16 within-chunk products lose the decays' precision
    and the WY solve has no bf16 kernel."""

    @functools.wraps(op)
    def full_precision_op(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return op(*args, **kwargs)

    return full_precision_op


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
    order: Tensor  # [units]: units by decreasing number of chunks
    active: list[int]  # units still running at each scan step
    resets: Tensor | None  # [n_chunks, 1, chunk_size]: a document starts inside its unit here
    padded: bool  # some slots are padding
    last_slot: Tensor  # [documents]: slot of each document's last token, -1 when it is empty

    @property
    def num_units(self) -> int:
        return self.order.numel()

    def to_chunks(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """[B, T, H, *D] -> [n_chunks, H, chunk_size, *D], padded with zeros."""
        flat = x.to(dtype).flatten(0, 1)
        if self.padded:  # padding slots point one past the last token: a zero row
            flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])
        chunks = flat.index_select(0, self.token_of_slot)
        return chunks.unflatten(0, (-1, self.chunk_size)).transpose(1, 2).contiguous()

    def from_chunks(self, x: Tensor) -> Tensor:
        """[n_chunks, H, chunk_size, *D] -> [B, T, H, *D], padding dropped."""
        flat = x.transpose(1, 2).flatten(0, 1)
        return flat.index_select(0, self.slot_of_token).unflatten(0, (self.batch, self.length))



def chunk_layout(
    batch: int,
    length: int,
    cu_seqlens: Tensor | None,
    documents_are_units: bool,
    chunk_size: int,
    device: torch.device,
) -> ChunkLayout:
    """The layout of `batch` rows of `length` tokens. On the meta device (shape-only runs, such as
    the dry run's memory estimate) its index tensors, which are data, are built on the CPU and
    moved there; packed documents cannot be laid out without their data."""
    if device.type != "meta":
        return _chunk_layout(batch, length, cu_seqlens, documents_are_units, chunk_size, device)
    if cu_seqlens is not None:
        raise ValueError("packed documents (cu_seqlens) cannot be laid out on the meta device")
    layout = _chunk_layout(batch, length, None, documents_are_units, chunk_size, torch.device("cpu"))
    tensors = {f.name: getattr(layout, f.name) for f in dataclasses.fields(layout) if isinstance(getattr(layout, f.name), Tensor)}
    return dataclasses.replace(layout, **{name: t.to(device) for name, t in tensors.items()})


def _chunk_layout(
    batch: int,
    length: int,
    cu_seqlens: Tensor | None,
    documents_are_units: bool,
    chunk_size: int,
    device: torch.device,
) -> ChunkLayout:
    if cu_seqlens is not None and (cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point()):
        raise ValueError(
            f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
        )
    documents = sequence_spans(batch, length, cu_seqlens)
    units = documents if cu_seqlens is None or documents_are_units else [(0, 0, length)]
    starts = torch.tensor([b * length + s for b, s, _ in units], device=device)
    lengths = torch.tensor([e - s for _, s, e in units], device=device)
    chunks_per_unit = (lengths + chunk_size - 1) // chunk_size
    order = torch.argsort(chunks_per_unit, descending=True, stable=True)
    starts, lengths, chunks_per_unit = starts[order], lengths[order], chunks_per_unit[order]

    steps = torch.arange(int(chunks_per_unit.max()), device=device)
    running = steps[:, None] < chunks_per_unit[None, :]  # [steps, units], a prefix of units per step
    step_of_chunk = steps[:, None].expand_as(running)[running]
    unit_of_chunk = torch.arange(len(units), device=device).expand_as(running)[running]
    offset = step_of_chunk[:, None] * chunk_size + torch.arange(chunk_size, device=device)
    n_tokens = batch * length
    token = torch.where(
        offset < lengths[unit_of_chunk, None], starts[unit_of_chunk, None] + offset, n_tokens
    ).flatten()
    slot = torch.empty(n_tokens + 1, dtype=torch.long, device=device)
    slot[token] = torch.arange(token.numel(), device=device)

    unit_starts = {b * length + s for b, s, _ in units}
    inner_starts = [b * length + s for b, s, e in documents if e > s and b * length + s not in unit_starts]
    resets = None
    if inner_starts:
        is_start = torch.zeros(n_tokens + 1, dtype=torch.bool, device=device)
        is_start[inner_starts] = True
        resets = is_start[token].view(-1, 1, chunk_size)
    last_token = torch.tensor([b * length + e - 1 if e > s else n_tokens for b, s, e in documents], device=device)
    last_slot = torch.where(last_token < n_tokens, slot[last_token], -1)
    return ChunkLayout(
        chunk_size=chunk_size,
        batch=batch,
        length=length,
        token_of_slot=token,
        slot_of_token=slot[:n_tokens],
        order=order,
        active=running.sum(1).tolist(),
        resets=resets,
        padded=token.numel() > n_tokens,
        last_slot=last_slot,
    )


@dataclass(frozen=True)
class ChunkGates:
    """Decays of a per-head scalar log-gate g inside each chunk (Gamma_i = g_1 + ... + g_i)."""

    within: Tensor  # [.., C, C]: exp(Gamma_i - Gamma_j) for j <= i, 0 above the diagonal
    from_start: Tensor  # [.., C]: exp(Gamma_i), the decay of the incoming state at token i
    to_end: Tensor  # [.., C]: exp(Gamma_C - Gamma_j), the decay of token j's write by the chunk end
    total: Tensor  # [..]: exp(Gamma_C), the decay of the incoming state over the whole chunk
    decays: bool = True  # False: every decay is 1 (no gate, no reset)

    def decay(self, scores: Tensor) -> Tensor:
        """Scores [.., C, C] of token i on token j, decayed from j to i and zero for j > i."""
        return scores * self.within if self.decays else scores.tril()


def segments(resets: Tensor | None, C: int, device: torch.device) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """linked [.., C, C] (j <= i in the same segment), and where `resets` [.., C] cuts the chunk:
    the tokens of its first segment and of its last segment (None, None without resets)."""
    linked = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    if resets is None:
        return linked, None, None
    segment = resets.cumsum(-1)
    linked = linked & (segment[..., :, None] == segment[..., None, :])
    return linked, segment == 0, segment == segment[..., -1:]


def chunk_gates(g: Tensor | None, resets: Tensor | None, like: Tensor) -> ChunkGates:
    """The decays of log-gates g [.., C] (None: no decay) inside each chunk, where `resets`
    [.., C] marks document starts inside the chunk (None: none).

    Decays are differences of within-chunk prefix sums, as in fla's and mamba_ssm's kernels. A
    document start cuts the chunk into segments: nothing crosses a segment boundary, the incoming
    state reaches only the first segment, and only the last segment writes the outgoing state.
    """
    if g is None and resets is None:
        return no_gates(like)
    C = like.shape[-1]
    log = (torch.zeros_like(like) if g is None else g).cumsum(-1)
    log_total = log[..., -1:]
    linked, first, last = segments(resets, C, like.device)
    gates = ChunkGates(
        within=(log[..., :, None] - log[..., None, :]).masked_fill(~linked, float("-inf")).exp(),
        from_start=log.exp(),
        to_end=(log_total - log).exp(),
        total=log_total.squeeze(-1).exp(),
    )
    if resets is None:
        return gates
    return ChunkGates(gates.within, gates.from_start * first, gates.to_end * last, gates.total * first[..., -1])


def no_gates(like: Tensor) -> ChunkGates:
    """ChunkGates of g = 0 (every decay 1), as broadcast views of `like` [.., C]."""
    C = like.shape[-1]
    ones = torch.ones((), dtype=like.dtype, device=like.device)
    return ChunkGates(
        within=torch.ones(C, C, dtype=like.dtype, device=like.device).tril().expand(*like.shape, C),
        from_start=ones.expand(like.shape),
        to_end=ones.expand(like.shape),
        total=ones.expand(like.shape[:-1]),
        decays=False,
    )


def scan_chunks(
    layout: ChunkLayout, initial_state: Tensor, per_chunk: Sequence[Tensor], step: StepFn
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Runs `state, outputs = step(state, *chunk_inputs)` over the chunks of every unit.

    `initial_state` is [units, H, K, V] in unit order; `per_chunk` tensors are in chunk layout.
    Returns the state entering every chunk and each step output concatenated (chunk layout).
    """
    per_step = [x.split(layout.active) for x in per_chunk]
    state = initial_state[layout.order]
    entering, outputs = [], []
    for j, n_active in enumerate(layout.active):
        state = state[:n_active]
        entering.append(state)
        state, out = step(state, *(x[j] for x in per_step))
        outputs.append(out)
    return torch.cat(entering), tuple(torch.cat(o) for o in zip(*outputs))


def final_states(
    layout: ChunkLayout, initial_state: Tensor | None, entering: Tensor, gates: ChunkGates, K: Tensor, written: Tensor
) -> Tensor:
    """The state after each document's last token p of chunk c, from the state entering c and the
    values the chunk writes (V, or the delta rule's corrected U'):
    S_p = exp(Gamma_p) S_c + sum_{j<=p} exp(Gamma_p - Gamma_j) k_j written_j^T."""
    nonempty, c, p = _document_ends(layout)
    decay, weights = gates.from_start[c, :, p], gates.within[c, :, p, :]  # [n, H], [n, H, C]
    states = decay[..., None, None] * entering[c] + (K[c] * weights[..., None]).transpose(-1, -2) @ written[c]
    return _with_document_states(layout, initial_state, nonempty, states)


def _document_ends(layout: ChunkLayout) -> tuple[Tensor, Tensor, Tensor]:
    """The non-empty documents, and the chunk and position in it of each one's last token."""
    nonempty = (layout.last_slot >= 0).nonzero().squeeze(1)
    last = layout.last_slot[nonempty]
    return nonempty, last // layout.chunk_size, last % layout.chunk_size


def _with_document_states(
    layout: ChunkLayout, initial_state: Tensor | None, nonempty: Tensor, states: Tensor
) -> Tensor:
    """One state per document: `states` for the non-empty ones, the initial state (or zeros) else."""
    if initial_state is None:
        initial_state = states.new_zeros(len(layout.last_slot), *states.shape[1:])
    return initial_state.index_put((nonempty,), states)


@dataclass(frozen=True)
class ChannelDecays:
    """Decays of a per-channel log-gate w [.., C, K] inside each chunk (Gamma_i = w_1 + ... + w_i).

    The decay exp(Gamma_i - Gamma_j) from token j to token i is split into a reader factor of i
    and a writer factor of j, so that the decayed scores of all pairs are one matmul. Both factors
    are taken relative to m = Gamma at mid-chunk, which halves the exponents' range: they overflow
    only when half a chunk decays by more than exp(-88) in float32 (RWKV-7's log w > -0.61 keeps
    it above exp(-20) at chunk 64). Resets cut the chunk into segments as in `chunk_gates`.
    """

    log: Tensor  # [.., C, K]: Gamma_i
    reader: Tensor  # [.., C, K]: exp(Gamma_i - m), reads the writes up to and including token i
    reader_before: Tensor  # [.., C, K]: exp(Gamma_{i-1} - m), reads the writes before token i
    writer: Tensor  # [.., C, K]: exp(m - Gamma_j)
    start_to_mid: Tensor  # [.., 1, K]: exp(m)
    mid_to_end: Tensor  # [.., 1, K]: exp(Gamma_C - m)
    total: Tensor  # [.., K]: exp(Gamma_C), 0 when a document starts in the chunk
    linked: Tensor  # [.., C, C] bool: j <= i in the same segment
    first: Tensor | None  # [.., C, 1]: 1 on the tokens of the first segment (None without resets)
    last: Tensor | None  # [.., C, 1]: 1 on the tokens of the last segment

    def from_start(self, read: Tensor) -> Tensor:
        """x o exp(Gamma_i) (x o exp(Gamma_{i-1})) from `read` = x o reader (x o reader_before):
        the incoming state's decay at (before) each token, zero after a document start."""
        read = read * self.start_to_mid
        return read if self.first is None else read * self.first

    def to_end(self, written: Tensor) -> Tensor:
        """x o exp(Gamma_C - Gamma_j) from `written` = x o writer: each write decayed to the
        chunk end, zero before the chunk's last document start."""
        written = written * self.mid_to_end
        return written if self.last is None else written * self.last

    def up_to(self, scores: Tensor) -> Tensor:
        """Scores [.., C, C] of token i on the tokens j <= i of its segment, zero elsewhere."""
        return scores.tril() if self.first is None else scores * self.linked

    def before(self, scores: Tensor) -> Tensor:
        """Scores [.., C, C] of token i on the tokens j < i of its segment, zero elsewhere."""
        return scores.tril(-1) if self.first is None else scores * self.linked.tril(-1)


def channel_decays(w: Tensor, resets: Tensor | None) -> ChannelDecays:
    """ChannelDecays of log-gates w [.., C, K] in chunk layout; `resets` [.., C] as in `chunk_gates`."""
    C = w.shape[-2]
    log = w.cumsum(-2)
    log_before = log - w
    mid = log[..., C // 2 : C // 2 + 1, :]
    linked, first, last = segments(resets, C, w.device)
    total = log[..., -1, :].exp()
    if first is not None:
        first, last = first[..., None].to(w.dtype), last[..., None].to(w.dtype)
        total = total * first[..., -1, :]
    return ChannelDecays(
        log=log,
        reader=(log - mid).exp(),
        reader_before=(log_before - mid).exp(),
        writer=(mid - log).exp(),
        start_to_mid=mid.exp(),
        mid_to_end=(log[..., -1:, :] - mid).exp(),
        total=total,
        linked=linked.expand(*w.shape[:-2], C, C),
        first=first,
        last=last,
    )


def channel_final_states(
    layout: ChunkLayout,
    initial_state: Tensor | None,
    entering: Tensor,
    decays: ChannelDecays,
    writes: Sequence[tuple[Tensor, Tensor]],
) -> Tensor:
    """`final_states` for per-channel decays and several rank-1 writes (key_j, written_j):
    S_p = exp(Gamma_p) o S_c + sum_{(key, written)} sum_{j<=p} exp(Gamma_p - Gamma_j) o key_j written_j^T."""
    nonempty, c, p = _document_ends(layout)
    reach = decays.linked[c, :, p][..., None]  # [n, H, C, 1]: j <= p in p's segment
    weights = (decays.log[c, :, p][:, :, None, :] - decays.log[c]).masked_fill(~reach, float("-inf")).exp()
    decay = decays.log[c, :, p].exp()  # [n, H, K]
    if decays.first is not None:
        decay = decay * decays.first[c, :, p]
    states = decay[..., None] * entering[c]
    for key, written in writes:
        states = states + (key[c] * weights).transpose(-1, -2) @ written[c]
    return _with_document_states(layout, initial_state, nonempty, states)


def chunked_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    per_head: Sequence[Tensor],
    scale: float | None,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    chunk_size: int,
) -> tuple[ChunkLayout, Tensor, Tensor | None, Tensor, Tensor, Tensor, list[Tensor]]:
    """The layout, the units' initial states, the validated initial_state in the compute dtype,
    and scale*q, k, v and the per-head inputs in chunk layout."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    dtype = compute_dtype(q, k, v, initial_state, *per_head)
    layout = chunk_layout(B, T, cu_seqlens, initial_state is not None, chunk_size, q.device)
    if initial_state is None:
        unit_states = torch.zeros(layout.num_units, H, K, V, dtype=dtype, device=q.device)
    else:
        expected = (len(layout.last_slot), H, K, V)
        if tuple(initial_state.shape) != expected:
            raise ValueError(
                f"initial_state must have shape {expected} (one state per sequence), got {tuple(initial_state.shape)}"
            )
        initial_state = unit_states = initial_state.to(dtype)
    q, k, v, *per_head = (layout.to_chunks(x, dtype) for x in (q, k, v, *per_head))
    return layout, unit_states, initial_state, q * scale, k, v, per_head
