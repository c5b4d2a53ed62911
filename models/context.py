"""Context parallelism as a model sees it: each of `size` ranks holds a contiguous piece of every
sequence (docs/design.md, "Context parallelism"). `parallel/context_parallel.py` implements the
communication (`ContextComm`); this module holds what crosses a piece boundary, for every mixer,
on plain tensors:

- recurrent states (`state_passing`): a rank summarises its piece by one run of the chunked op,
  receives the state entering its piece from the previous rank, sends on that state carried
  through its piece, and corrects its output with what it received;
- short-convolution halos and RWKV's token shift (`conv_halo`, `stream_tails`, `shifted`);
- the positions and documents attention needs (`Piece.positions`, `Piece.documents`).

A `Piece` describes this rank's part of the current batch; it is made by `cut_batch` from the
whole batch and is active (`active_piece`) inside `context_parallel(piece)`, which must enclose
the forward and the backward (activation checkpointing recomputes the forward there). Mixers
reach it through the shared helpers (`cached_recurrence`, `conv_features`, `segment_conv`,
`token_shift`) and declare what they need in `cp_plan` (models/spec.py). Decoding from a cache
is one process: a cache under an active piece is refused.

Layouts follow the ops (docs/design.md, op conventions): states [N, H, K, V], updated as
S_t = A_t S_{t-1} + k_t v_t^T column by column, A_t independent of v.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from models.ops.chunking import autocast_off
from models.packing import cu_seqlens_from_mask, document_ids, document_start_mask, positions_in_documents, with_row_starts

Transition = Literal["matrix", "decay"]
"""How a piece's transition is summarised: "matrix", the K x K product of the per-token
transitions, read from one run of the op with v widened by K zero columns from the initial state
[0 | I] (any op linear in its state with a transition independent of v); "decay", a scalar per
head, exp of the summed log-gate `g` (simple GLA / Mamba2), from one plain run."""


class ContextComm(Protocol):
    """The communication of a context-parallel group (parallel/context_parallel.py). Both calls
    are autograd-aware: gradients flow back to the rank that sent. `after`, when given, is the
    output of the previous exchange: the backward of this exchange then runs before that one's
    on every rank, so that the ranks' backward exchanges pair up in the same order whatever
    else their graphs hold (packed documents make them differ)."""

    rank: int
    size: int

    def all_gather(self, x: Tensor, after: Tensor | None = None) -> Tensor:
        """[size, *x.shape]: every rank's x, in rank order."""
        ...

    def from_previous(self, x: Tensor, after: Tensor | None = None) -> Tensor:
        """The previous rank's x (same shape on every rank); zeros on rank 0."""
        ...

    def receive(self, like: Tensor, after: Tensor | None = None) -> Tensor:
        """What the previous rank `send`s (shaped like `like`, zeros on rank 0); this rank waits for it."""
        ...

    def send(self, x: Tensor, after: Tensor | None = None) -> Tensor:
        """Hand x to the next rank's `receive` (nothing on the last rank); returns a scalar
        token whose backward brings x's gradient back from the next rank."""
        ...


@dataclass(frozen=True)
class Piece:
    """This rank's piece of a batch of `batch` rows: tokens [rank * length, (rank + 1) * length)
    of every row. `doc_starts` [batch, size * length] marks the document starts of the whole
    rows (None: each row one document)."""

    comm: ContextComm
    batch: int
    length: int
    doc_starts: Tensor | None
    _last_exchanged: list[Tensor] = field(default_factory=list, repr=False, compare=False)
    _streams: dict[int, Streams] = field(default_factory=dict, repr=False, compare=False)

    @property
    def start(self) -> int:
        return self.comm.rank * self.length

    def rows(self, first: int, stop: int) -> Piece:
        """The piece of rows [first, stop) (a pipeline microbatch), with its own exchange order."""
        doc_starts = None if self.doc_starts is None else self.doc_starts[first:stop]
        return Piece(self.comm, stop - first, self.length, doc_starts)

    @torch.compiler.disable
    def all_gather(self, x: Tensor) -> Tensor:
        """[size, *x.shape]: every rank's x (autograd-aware), ordered after the piece's earlier exchanges."""
        return self._ordered(self.comm.all_gather, x)

    @torch.compiler.disable
    def from_previous(self, x: Tensor) -> Tensor:
        """The previous rank's x, zeros on rank 0 (autograd-aware), ordered after the earlier exchanges."""
        return self._ordered(self.comm.from_previous, x)

    @torch.compiler.disable
    def relay(self, summary: Tensor, combine: Callable[[Tensor | None, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """The state entering this piece, passed along the ranks (a pipelined chain): received
        from the previous rank, this piece's summary applied to it and the result sent on. Returns
        it and the send's token, which the caller's output must hold (so that every rank's backward
        passes the gradient back along the chain)."""
        incoming = self._ordered(self.comm.receive, combine(None, summary))
        return incoming, self._ordered(self.comm.send, combine(incoming, summary))

    def _ordered(self, exchange: Callable[..., Tensor], x: Tensor) -> Tensor:
        """exchange(x) after the piece's previous exchange; one without a gradient (nothing to
        exchange in the backward) stays out of the order."""
        if not x.requires_grad:
            return exchange(x)
        out = exchange(x, self._last_exchanged[-1] if self._last_exchanged else None)
        self._last_exchanged[:] = [out]
        return out

    @functools.cached_property
    def continues(self) -> Tensor:
        """[batch] bool: the row's first token continues a document of the previous piece."""
        if self.comm.rank == 0:
            return torch.zeros(self.batch, dtype=torch.bool)
        if self.doc_starts is None:
            return torch.ones(self.batch, dtype=torch.bool)
        return ~self.doc_starts[:, self.start].cpu()

    @functools.cached_property
    def local_cu_seqlens(self) -> Tensor | None:
        """The document starts of this piece over its flattened batch * length tokens, every row
        start included (what the model's mixers receive), None without packed documents."""
        if self.doc_starts is None:
            return None
        return cu_seqlens_from_mask(self.doc_starts[:, self.start : self.start + self.length])

    @functools.cached_property
    def positions(self) -> Tensor:
        """[batch, length]: each token's position in its document (RoPE's)."""
        B, T = self.batch, self.length
        if self.doc_starts is None:
            return torch.arange(self.start, self.start + T).expand(B, T)
        return self._global_positions[:, self.start : self.start + T]

    @functools.cached_property
    def _global_positions(self) -> Tensor:
        return positions_in_documents(self._global_cu_seqlens, self.doc_starts.numel()).view_as(self.doc_starts)

    @functools.cached_property
    def _global_cu_seqlens(self) -> Tensor:
        return cu_seqlens_from_mask(self.doc_starts)

    @functools.cached_property
    def documents(self) -> Tensor | None:
        """[batch, size * length]: the document index of every token of the whole rows, None
        without packed documents."""
        if self.doc_starts is None:
            return None
        return document_ids(self._global_cu_seqlens, self.doc_starts.numel()).view_as(self.doc_starts)

    @functools.cached_property
    def _documents(self) -> tuple[Tensor, Tensor, Tensor]:
        """This piece's documents as the mixers cut them (rows, then packed documents): the row
        of each, and each row's first and last document index."""
        B, T = self.batch, self.length
        if self.local_cu_seqlens is None:
            rows = torch.arange(B)
            return rows, rows, rows
        starts = self.local_cu_seqlens[:-1].long().cpu()
        row = starts // T
        first = torch.searchsorted(starts, torch.arange(B) * T)
        last = torch.cat([first[1:], torch.tensor([starts.numel()])]) - 1
        return row, first, last

    def streams(self, n_segments: int) -> Streams:
        """How the segments of an op call continue across pieces. The call runs G copies of this
        piece's documents, copy-major (G = 1: the documents themselves; MoM and SSE: one copy per
        memory or partition); a stream is one copy of one row. Kept per segment count: every
        layer asks."""
        if n_segments not in self._streams:
            self._streams[n_segments] = self._count_streams(n_segments)
        return self._streams[n_segments]

    def _count_streams(self, n_segments: int) -> Streams:
        row, first, last = self._documents
        n_documents = row.numel()
        if n_segments % n_documents:
            raise ValueError(f"an op call of {n_segments} segments is no whole number of copies of the piece's {n_documents} documents")
        copies = n_segments // n_documents
        segment = torch.arange(n_segments)
        copy, document = segment // n_documents, segment % n_documents
        enters = (first[row[document]] == document) & self.continues[row[document]]
        stream = copy * self.batch + row[document]
        enter = torch.where(enters, stream, -1)
        leave = (torch.arange(copies)[:, None] * n_documents + last[None, :]).flatten()
        return Streams(enter, leave)


@dataclass(frozen=True)
class Streams:
    """`enter` [segments]: the stream whose incoming state (or tail) each segment starts from,
    -1 for none (it starts a document); `leave` [streams]: the segment whose end each stream
    hands on to the next piece."""

    enter: Tensor
    leave: Tensor

    @functools.cached_property
    def entering(self) -> list[tuple[int, int]]:
        """(segment, stream) of every entering segment."""
        segments = (self.enter >= 0).nonzero().flatten().tolist()
        return [(s, int(self.enter[s])) for s in segments]


_active: list[Piece | None] = [None]


@torch.compiler.disable  # runs eager inside compiled blocks: no guard on the piece, no recompiles per batch
def active_piece() -> Piece | None:
    """The piece of the batch being computed under `context_parallel`, else None."""
    return _active[0]


@contextlib.contextmanager
def context_parallel(piece: Piece) -> Iterator[Piece]:
    """Make `piece` active: enclose the model's forward and backward."""
    previous = _active[0]
    _active[0] = piece
    try:
        yield piece
    finally:
        _active[0] = previous


def cut_batch(
    input_ids: Tensor, labels: Tensor, cu_seqlens: Tensor | None, rank: int, size: int
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """This rank's piece of a whole batch: (input_ids, labels) [B, T / size] (labels already
    shifted over the whole rows), the piece's cu_seqlens (every row start included; None without
    packing) and the whole rows' document starts [B, T] for `Piece` (None without packing)."""
    B, T = input_ids.shape
    if T % size:
        raise ValueError(f"a sequence of {T} tokens does not split into {size} equal pieces")
    length = T // size
    cut = slice(rank * length, (rank + 1) * length)
    if cu_seqlens is None:
        return input_ids[:, cut], labels[:, cut], None, None
    starts = document_start_mask(with_row_starts(cu_seqlens, B, T), B, T)
    return input_ids[:, cut], labels[:, cut], cu_seqlens_from_mask(starts[:, cut]), starts


def no_cache(piece: Piece | None, cache: dict | None) -> None:
    if piece is not None and cache is not None:
        raise ValueError("decoding from a cache runs in one process: context parallelism is for training forwards")


# --- recurrent state passing --------------------------------------------------------------------


def _bind(op: Callable, inputs: tuple[Tensor, ...]) -> dict[str, Tensor]:
    names = list(inspect.signature(op).parameters)
    return dict(zip(names, inputs))


@torch.compiler.disable
@autocast_off
def state_passing(
    piece: Piece,
    op: Callable,
    inputs: tuple[Tensor, ...],
    transition: Transition,
    scale: float,
    chunk_size: int,
    cu_seqlens: Tensor | None,
    options: dict[str, Any],
) -> Tensor:
    """The op's output on this piece with the state its earlier pieces hand on (docs/specs:
    S_t = S_in M_{s..t} + H_{s..t}): one run of the op yields this piece's zero-start output, its
    summary (final state, transition) per stream and what the incoming state adds to each
    output (all outside autocast, as the ops themselves run); the state passes along the
    ranks, each applying its summary (S_in(p + 1) =
    S_in(p) M_p + H_p): measured faster than an all-gather of every summary
    (bench/cp_exchange.py), and each rank sends one state instead of cp - 1 summaries."""
    arguments = _bind(op, inputs)
    n_segments = arguments["v"].shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    streams = piece.streams(n_segments)
    run = functools.partial(op, scale=scale, output_final_state=True, cu_seqlens=cu_seqlens, chunk_size=chunk_size, **options)
    ran = summarise(transition, run, arguments, streams, cu_seqlens, scale)
    incoming, sent = piece.relay(ran.summary, ran.combine)
    return ran.output + read_incoming(ran.reach, incoming, streams, cu_seqlens) + 0 * sent


@dataclass(frozen=True)
class PieceRun:
    """One run of a chunked op over a piece, from a zero incoming state: its `output`, the
    `reach` [.., H, K] of each output (an incoming state S_in adds S_in^T reach_t to it), and
    each stream's `summary`, which `combine(S_in, summary)` turns into the state it hands on
    (`combine(None, summary)` from a zero state)."""

    output: Tensor
    reach: Tensor
    summary: Tensor
    combine: Callable[[Tensor | None, Tensor], Tensor]


def summarise(
    transition: Transition, run: Callable, arguments: dict[str, Tensor], streams: Streams, cu_seqlens: Tensor | None, scale: float
) -> PieceRun:
    """`run(**arguments, initial_state=...)` (the op with output_final_state) summarised as
    `transition` says, for the segments `streams` maps."""
    if transition == "matrix":
        return _matrix_run(run, arguments, streams)
    return _decay_run(run, arguments, streams, cu_seqlens, scale)


def _matrix_run(run: Callable, arguments: dict[str, Tensor], streams: Streams) -> PieceRun:
    """v widened by K zero columns, from [0 | I] in the entering segments (zero elsewhere): the
    final state is [H_p | M_p] and the widened outputs are reach_t = scale M_{s..t}^T q_t."""
    v, k = arguments["v"], arguments["k"]
    H, K, V = v.shape[-2], k.shape[-1], v.shape[-1]
    dtype = torch.promote_types(v.dtype, torch.float32)
    enters = (streams.enter >= 0).to(device=v.device, dtype=dtype)
    identity = torch.eye(K, dtype=dtype, device=v.device) * enters[:, None, None, None]  # [N, 1, K, K]
    initial = torch.cat([v.new_zeros(enters.numel(), H, K, V, dtype=dtype), identity.expand(-1, H, K, K)], dim=-1)
    widened = arguments | {"v": torch.cat([v, v.new_zeros(*v.shape[:-1], K)], dim=-1)}
    o, final = _recomputed_in_backward(run, widened, initial)
    o, reach = o.split([V, K], dim=-1)

    def combine(state: Tensor | None, part: Tensor) -> Tensor:
        written, moved = part.split([V, K], dim=-1)
        return written if state is None else moved @ state.to(moved.dtype) + written

    return PieceRun(o, reach, final[streams.leave.to(final.device)], combine)


def _recomputed_in_backward(run: Callable, arguments: dict[str, Tensor], initial: Tensor) -> tuple[Tensor, Tensor]:
    """`run(**arguments, initial_state=initial)` keeping only its inputs for the backward, which
    runs it again: the widened run's chunk intermediates would hold (V + K) / V of one process's
    per token (bench/context_parallel.py)."""
    names = list(arguments)

    def call(*tensors: Tensor) -> tuple[Tensor, Tensor]:
        return run(**dict(zip(names, tensors[:-1])), initial_state=tensors[-1])

    return torch.utils.checkpoint.checkpoint(call, *arguments.values(), initial, use_reentrant=False)


def _decay_run(run: Callable, arguments: dict[str, Tensor], streams: Streams, cu_seqlens: Tensor | None, scale: float) -> PieceRun:
    """A plain run; the transition is exp of the log-gate `g` summed over the piece (one scalar
    per head) and reach_t = scale exp(sum of g up to t) q_t."""
    q, g = arguments["q"], arguments["g"]
    o, final = run(**arguments, initial_state=None)
    H, K, V = final.shape[1:]
    decay_to = _segment_cumsum(g, streams, cu_seqlens)  # [B, T, H]: summed log-gate from the entering segment's start
    leave = streams.leave.to(final.device)
    moved = _segment_ends(decay_to, streams, cu_seqlens)[leave].exp()  # [streams, H]
    summary = torch.cat([final[leave].flatten(2), moved[..., None].to(final.dtype)], dim=-1)

    def combine(state: Tensor | None, part: Tensor) -> Tensor:
        written, factor = part.split([K * V, 1], dim=-1)
        written = written.unflatten(-1, (K, V))
        return written if state is None else factor[..., None] * state.to(written.dtype) + written

    reach = (scale * q * decay_to.exp()[..., None]).to(o.dtype)
    return PieceRun(o, reach, summary, combine)


def _segment_cumsum(g: Tensor, streams: Streams, cu_seqlens: Tensor | None) -> Tensor:
    """[B, T, H]: the log-gate summed from the start of each entering segment up to each token,
    -inf outside entering segments."""
    dtype = torch.promote_types(g.dtype, torch.float32)
    out = torch.full(g.shape, float("-inf"), dtype=dtype, device=g.device)
    if not streams.entering:
        return out
    if cu_seqlens is None:
        rows = torch.tensor([s for s, _ in streams.entering], device=g.device)
        return out.index_copy(0, rows, g.index_select(0, rows).to(dtype).cumsum(1))
    tokens, sums = _entering_tokens(streams, cu_seqlens, g.device), []
    bounds = cu_seqlens.tolist()
    for s, _ in streams.entering:
        sums.append(g[:, bounds[s] : bounds[s + 1]].to(dtype).cumsum(1))
    return out.index_copy(1, tokens, torch.cat(sums, dim=1))


def _entering_tokens(streams: Streams, cu_seqlens: Tensor, device: torch.device) -> Tensor:
    """The token indices of the entering segments, in segment order."""
    bounds = cu_seqlens.tolist()
    return torch.cat([torch.arange(bounds[s], bounds[s + 1], device=device) for s, _ in streams.entering])


def _segment_ends(decay_to: Tensor, streams: Streams, cu_seqlens: Tensor | None) -> Tensor:
    """[segments, H]: each entering segment's whole summed log-gate (0 when empty), -inf for the others."""
    n = streams.enter.numel()
    out = decay_to.new_full((n, decay_to.shape[-1]), float("-inf"))
    rows = []
    for s, _ in streams.entering:
        if cu_seqlens is None:
            rows.append(decay_to[s, -1])
        else:
            a, e = cu_seqlens[s].item(), cu_seqlens[s + 1].item()
            rows.append(decay_to[0, e - 1] if e > a else decay_to.new_zeros(decay_to.shape[-1]))
    if not rows:
        return out
    index = torch.tensor([s for s, _ in streams.entering], device=decay_to.device)
    return out.index_copy(0, index, torch.stack(rows))


def read_incoming(reach: Tensor, incoming: Tensor, streams: Streams, cu_seqlens: Tensor | None) -> Tensor:
    """What the incoming states add to the output: reach_t [.., H, K] times S_in [H, K, V] of
    the stream each token's segment enters from (zero in segments that enter from none)."""
    incoming = incoming.to(reach.dtype)
    if cu_seqlens is None:  # one segment per row, stream = row
        mask = (streams.enter >= 0).to(device=reach.device, dtype=reach.dtype)
        states = incoming[streams.enter.clamp(min=0).to(incoming.device)] * mask[:, None, None, None]
        return torch.einsum("bthk,bhkv->bthv", reach, states)
    out = reach.new_zeros(*reach.shape[:-1], incoming.shape[-1]) + 0 * incoming.sum()  # every rank's graph holds the exchange
    if not streams.entering:
        return out
    bounds = cu_seqlens.tolist()
    added = [torch.einsum("bthk,hkv->bthv", reach[:, bounds[s] : bounds[s + 1]], incoming[stream]) for s, stream in streams.entering]
    return out.index_add(1, _entering_tokens(streams, cu_seqlens, reach.device), torch.cat(added, dim=1))


# --- halos -----------------------------------------------------------------------------------------


def _rows(x: Tensor, piece: Piece) -> Tensor:
    """[B, T, C] from the mixers' [B, T, C] or packed [1, B * T, C]."""
    return x.reshape(piece.batch, piece.length, x.shape[-1])


def _last_of_rows(rows: Tensor, piece: Piece, cu_seqlens: Tensor | None, n: int) -> Tensor:
    """The last n inputs of each row's last document [B, n, C], zero before that document's start."""
    last = rows[:, rows.shape[1] - n :]
    if cu_seqlens is None:
        return last
    documents = document_ids(cu_seqlens, rows.shape[0] * rows.shape[1]).view(rows.shape[:2]).to(rows.device)
    return last * (documents[:, -n:] == documents[:, -1:])[..., None]


def halo(piece: Piece, x: Tensor, cu_seqlens: Tensor | None, n: int) -> Tensor:
    """[B, n, C]: the n inputs before each row of this piece, zero where they lie before the
    start of the row's first document. n must not exceed the piece length."""
    if n > piece.length:
        raise ValueError(f"a halo of {n} tokens reaches past the previous piece of {piece.length} tokens")
    rows = _rows(x, piece)
    previous = piece.from_previous(_last_of_rows(rows, piece, cu_seqlens, n))
    return previous * piece.continues.to(device=x.device, dtype=x.dtype)[:, None, None]


@torch.compiler.disable
def conv_halo(piece: Piece, conv: Callable, x: Tensor, cu_seqlens: Tensor | None, lag: int) -> Tensor:
    """conv(x) as if each row continued the previous piece's row: the row's `lag` preceding
    inputs are prepended (a halo), the convolution runs, and the halo's outputs are dropped.
    `conv(x, cu_seqlens)` returns (y, tail) like ShortConv."""
    if lag == 0:
        return conv(x, cu_seqlens)[0]
    B, T = piece.batch, piece.length
    extended = torch.cat([halo(piece, x, cu_seqlens, lag), _rows(x, piece)], dim=1)  # [B, lag + T, C]
    if cu_seqlens is None:
        return conv(extended, None)[0][:, lag:]
    # each row's first segment takes in its halo (zero where it starts a document)
    row = torch.div(cu_seqlens, T, rounding_mode="floor")
    moved = cu_seqlens + lag * (row + (cu_seqlens % T != 0).to(cu_seqlens.dtype))
    y = conv(extended.reshape(1, B * (T + lag), -1), moved)[0]
    return y.view(B, T + lag, -1)[:, lag:].reshape(x.shape[:-1] + y.shape[-1:])


@torch.compiler.disable
def shifted(piece: Piece, x: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """x_{t-1} for every token (RWKV's token shift): the previous piece's last token before each
    row, zero at document starts."""
    rows = _rows(x, piece)
    previous = torch.cat([halo(piece, x, cu_seqlens, 1), rows[:, :-1]], dim=1)
    if cu_seqlens is not None:
        starts = document_start_mask(cu_seqlens, piece.batch, piece.length).to(x.device)
        starts[:, 0] &= ~piece.continues.to(x.device)
        previous = previous * ~starts[..., None]
    return previous.reshape(x.shape)


@torch.compiler.disable
def stream_tails(piece: Piece, x: Tensor, cu_seqlens: Tensor, lag: int) -> Tensor:
    """[segments, lag, C]: the `lag` inputs that precede each segment of x [R, C] in its stream
    (segments as in `Piece.streams`), gathered from however many earlier pieces they lie in;
    zeros for segments that start a document."""
    n_segments = cu_seqlens.numel() - 1
    streams = piece.streams(n_segments)
    leave = streams.leave.to(x.device)
    ends, lengths = cu_seqlens[1:][leave].long(), cu_seqlens.diff()[leave].long()
    taps = torch.arange(lag, device=x.device)
    index = ends[:, None] - lag + taps  # the last `lag` rows of each leaving segment
    valid = taps >= lag - lengths[:, None]
    items = x.index_select(0, index.clamp(min=0).flatten()).view(*index.shape, -1) * valid[..., None]
    passes = streams.enter[streams.leave] >= 0  # the leaving segment continues the incoming tail
    counts = torch.stack([lengths.clamp(max=lag), passes.to(lengths.device).long()], dim=-1)
    gathered, meta = piece.all_gather(items), piece.all_gather(counts)

    def combine(tail: Tensor | None, part: tuple[Tensor, Tensor]) -> Tensor:
        new, (count, keep) = part[0], part[1].unbind(-1)
        if tail is None:
            return new
        tail = tail * keep.to(tail.device, tail.dtype)[:, None, None]
        joined = torch.cat([tail, new], dim=1)  # the real items of `new` are its last `count`
        source = taps + count.to(x.device)[:, None]
        source = torch.where(taps < lag - count.to(x.device)[:, None], source, taps + lag)
        return joined.gather(1, source[..., None].expand(-1, -1, joined.shape[-1]))

    tail = None
    for p in range(piece.comm.rank):
        tail = combine(tail, (gathered[p], meta[p]))
    if tail is None:
        tail = gathered[0] * 0
    enter = streams.enter.to(x.device)
    return tail[enter.clamp(min=0)] * (enter >= 0).to(x.dtype)[:, None, None]
