"""Codec-state AdamW steps over many tensors per call.

The codec path of `AdamW.step` hands the parameters that step (each one's local shard,
gradient, moments' parts and master copy: a `Member`), sorted by codec, device, dtypes and step
count, to `Stepper.step`, which cuts them into buckets and runs `optim.update.codec_step` once
per bucket: eagerly, or `torch.compile`d (one graph per codec and dtypes, for every bucket size:
the row count is a dynamic dimension, and the learning rate and step count are tensor inputs).

A bucket lays its tensors out as one array per operand: rows of whole blocks, `[rows, block]`,
for block codecs (each tensor's rows padded to whole blocks with the code of zero; per-block
scales `[rows, 1]`), flat `[elements]` for the others. A contiguous tensor whose last dim is
whole blocks is a view in that layout, so a large one is stepped where it lies, in slices of
rows of at most `bucket_numel` elements (blocks never cross rows, so a slice quantises as the
whole does). Smaller tensors (`ALONE_NUMEL`), and those that need padding, are copied together
into a shared bucket of up to `bucket_numel` elements and copied back after the step. Local shards of DTensors are plain tensors
here: placements never enter where the shards hold whole blocks. A shard whose blocks other
ranks share (`optim/shards.py`) is stepped alone, in two passes around the exchange of its
blocks' statistics (`Stepper.shared_statistics`, `Stepper.shared_step`): its rows laid out on the
global grid (padded before its first element to where that element's block begins, and after its
last), so that each block of the bucket is a piece of one global block.
"""
from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from common.processes import is_main_process
from optim.codecs import StateCodec
from optim.codecs.base import BlockCodec, Parts, Stats, scale_shape
from optim.shards import BlockGrid
from optim.update import codec_step, coefficients, moment_statistics

# Elements per call: it bounds the temporaries (about 10 bytes an element: the fp32 moments
# between the compiled step's loops) and amortises a call. On CPU a compiled call also costs an
# OpenMP barrier per loop (3 for fp8 and int8), and where the step's threads share their cores
# with other work each barrier waits up to a scheduler time slice: the bench's flat set on two
# busy threads stepped fp8 in 0.77 s with 4M-element calls, 3.2 s with 256K ones (one thread:
# the same within 5%; the compiled loops work row by row, in cache at any size). Shared buckets
# are copied in and out, which stays in cache at 256K: the quickstart model's fp8 step took 12%
# longer at 4M on one thread, while on two busy ones the noise exceeded the difference.
BUCKET_NUMEL = 1 << 22
# A viewable tensor this large steps alone where it lies, rather than being copied into a shared
# bucket and back: on CPU a compiled call costs ~0.1-0.2 ms (guards, wrapper), copying a
# tensor's operands in and out ~2.5 ns an element, so from ~64K elements a call of its own is
# cheaper; on a GPU a call costs as much as copying millions of elements, so only tensors that
# fill a bucket step alone.
ALONE_NUMEL = {"cpu": 1 << 16}
RECOMPILE_LIMIT = 64  # graphs of the compiled step kept: codecs x dtypes x devices, and dynamo's size-1 specialisation


@dataclass
class Member:
    """One parameter's local tensors for this step: `target` is updated in fp32 arithmetic (the
    master copy, or the parameter's shard itself), `param` gets the result when `target` is a
    master copy, `m` and `v` are the moments' parts. `grid`: where the shard's blocks are shared
    with other ranks (its per-block parts then span its rows' every block), else None."""

    target: Tensor
    grad: Tensor
    m: Parts
    v: Parts
    param: Tensor | None = None
    grid: BlockGrid | None = None


@dataclass(frozen=True)
class Layout:
    """Where one tensor's rows go: `rows` rows of `block` elements (`block` 1 = flat). A tensor
    row's first element goes `lead` elements into its first block (shared blocks: its offset
    in its global block), and its per-block parts are `columns` of its rows' every block (None:
    they are its own blocks, in order)."""

    rows: int
    block: int
    lead: int = 0
    columns: slice | None = None

    @staticmethod
    def of(t: Tensor, block: int | None, grid: BlockGrid | None = None) -> Layout:
        if block is None:
            return Layout(t.numel(), 1)
        if grid is None:
            return Layout(scale_shape(t.shape, block).numel(), block)
        rows = t.numel() // grid.width if grid.width else 0
        return Layout(rows * grid.count, block, grid.lead, slice(grid.first, grid.first + grid.count))

    def view(self, t: Tensor) -> Tensor | None:
        """`t` (shaped like the parameter) as `[rows, block]` (flat: `[rows]`) without a copy, or None."""
        if not t.is_contiguous() or self.columns is not None:
            return None
        if self.block == 1:
            return t.view(-1)
        last = t.shape[-1] if t.ndim else 1
        return t.view(-1, self.block) if last % self.block == 0 else None

    def _row_blocks(self, last: int) -> int:
        return -(-(self.lead + last) // self.block)

    def padded(self, t: Tensor, pad: float) -> Tensor:
        """`t` as `[rows, block]`, a copy: each row padded with `pad` to whole blocks (`lead` before it)."""
        if self.block == 1:
            return t.reshape(-1)
        last = t.shape[-1] if t.ndim else 1
        after = self._row_blocks(last) * self.block - self.lead - last
        return F.pad(t.reshape(-1, last), (self.lead, after), value=pad).view(-1, self.block)

    def unpadded(self, rows: Tensor, shape: torch.Size) -> Tensor:
        """Inverse of `padded`: a view of `rows` shaped `shape`."""
        if self.block == 1:
            return rows.view(shape)
        last = shape[-1] if len(shape) else 1
        return rows.reshape(-1, self._row_blocks(last) * self.block)[:, self.lead : self.lead + last].view(shape)

    def block_rows(self, part: Tensor) -> Tensor:
        """A per-block part as `[rows, 1]`: a view of its own blocks, or a copy of `columns`."""
        if self.columns is not None:
            part = part[..., self.columns]
        return part.view(-1, 1) if part.is_contiguous() else part.reshape(-1, 1)


@functools.cache
def _part_kinds(codec: StateCodec) -> dict[str, bool]:
    """Per suffix: True for a part shaped like the tensor (codes), False for one per block."""
    return {suffix: suffix not in codec.block_parts for suffix in codec.suffixes}


@functools.cache
def _fill(codec: StateCodec, signed: bool) -> dict[str, float]:
    """Per part, what padding holds so that it decodes to 0: the code of zero in a part shaped
    like the tensor (int8's signed map has its zero in the middle), an empty block's scale in a
    per-block part."""
    probe = torch.zeros(1, codec.block or 1)
    empty = codec.zeros(probe)
    coded = codec.encode(probe, signed)
    return {suffix: (coded if whole else empty)[suffix].reshape(-1)[0].item() for suffix, whole in _part_kinds(codec).items()}


@dataclass
class _Piece:
    """Rows `start:stop` of a member (all of them when `start` is None)."""

    member: Member
    layout: Layout
    start: int | None = None
    stop: int | None = None

    @property
    def rows(self) -> int:
        return self.layout.rows if self.start is None else self.stop - self.start


def _viewable(member: Member, layout: Layout, codec: StateCodec) -> bool:
    kinds = _part_kinds(codec)
    wholes = [member.target, member.grad, *(t for parts in (member.m, member.v) for k, t in parts.items() if kinds[k])]
    if member.param is not None:
        wholes.append(member.param)
    scales = [t for parts in (member.m, member.v) for k, t in parts.items() if not kinds[k]]
    return all(layout.view(t) is not None for t in wholes) and all(t.is_contiguous() for t in scales)


def plan(members: list[Member], codec: StateCodec, bucket_numel: int, alone_numel: int | None = None) -> Iterator[list[_Piece]]:
    """Buckets of pieces, in order: viewable members of `alone_numel` elements or more alone
    (in slices of up to `bucket_numel`), the rest packed together up to `bucket_numel`
    elements. `bucket_numel` 0: one bucket per member, whole."""
    alone_numel = bucket_numel if alone_numel is None else min(alone_numel, bucket_numel)
    block = codec.block or 1
    shared: list[_Piece] = []
    shared_rows = 0
    for member in members:
        layout = Layout.of(member.target, codec.block, member.grid)
        if layout.rows == 0:
            continue
        if bucket_numel <= 0:
            yield [_Piece(member, layout)]
            continue
        per_bucket = max(1, bucket_numel // block)
        if layout.rows * block >= alone_numel and _viewable(member, layout, codec):
            starts = list(range(0, layout.rows, per_bucket))
            if layout.rows - starts[-1] == 1 and len(starts) > 1:
                starts[-1] -= 1  # no slice of one row (see `_Arrays`)
            for start, stop in zip(starts, [*starts[1:], layout.rows]):
                yield [_Piece(member, layout, start, stop)]
            continue
        if shared and (shared_rows + layout.rows) * block > bucket_numel:
            yield shared
            shared, shared_rows = [], 0
        shared.append(_Piece(member, layout))
        shared_rows += layout.rows
    if shared:
        yield shared


class _Arrays:
    """A bucket's operands in the row layout: views of its one piece, or copies of all of them.
    A bucket of one row gets a second row of padding: dynamo would specialise a size of 1 and
    compile once more."""

    def __init__(self, pieces: list[_Piece], codec: StateCodec):
        self.pieces, self.codec, self.kinds = pieces, codec, _part_kinds(codec)
        first = pieces[0]
        self.rows = sum(piece.rows for piece in pieces)
        self.views = len(pieces) == 1 and self.rows > 1 and _viewable(first.member, first.layout, codec)
        self.target = self._whole(lambda m: m.target, 0.0)
        self.grad = self._whole(lambda m: m.grad, 0.0)
        self.param = None if first.member.param is None else self._whole(lambda m: m.param, 0.0)
        self.m = self._parts(lambda m: m.m, True)
        self.v = self._parts(lambda m: m.v, False)

    def _rows(self, piece: _Piece, t: Tensor, whole: bool, pad: float) -> Tensor:
        if whole:  # a view where the rows are whole blocks (copied by the join when shared), else a padded copy
            rows = piece.layout.view(t)
            rows = piece.layout.padded(t, pad) if rows is None else rows
        else:
            rows = piece.layout.block_rows(t)
        return rows if piece.start is None else rows[piece.start : piece.stop]

    def _join(self, rows: list[Tensor], pad: float) -> Tensor:
        if self.rows == 1:
            rows = [*rows, torch.full_like(rows[0], pad)]
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def _whole(self, get: Callable[[Member], Tensor], pad: float) -> Tensor:
        return self._join([self._rows(piece, get(piece.member), True, pad) for piece in self.pieces], pad)

    def _parts(self, get: Callable[[Member], Parts], signed: bool) -> Parts:
        fill = _fill(self.codec, signed)
        return {
            suffix: self._join([self._rows(piece, get(piece.member)[suffix], whole, fill[suffix]) for piece in self.pieces], fill[suffix])
            for suffix, whole in self.kinds.items()
        }

    def write_back(self, new_m: Parts, new_v: Parts) -> None:
        """The moments' new parts into the state, and (copies only) the updated rows into the tensors."""
        if self.views:
            for parts, new in ((self.m, new_m), (self.v, new_v)):
                for suffix, rows in parts.items():
                    rows.copy_(_as_stored(new[suffix], rows))
            return
        pairs: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}

        def add(dst: Tensor, src: Tensor) -> None:
            dsts, srcs = pairs.setdefault(dst.dtype, ([], []))
            dsts.append(dst)
            srcs.append(_as_stored(src, dst))

        start = 0
        for piece in self.pieces:
            stop = start + piece.rows
            member, layout = piece.member, piece.layout
            add(member.target, layout.unpadded(self.target[start:stop], member.target.shape))
            if member.param is not None:
                add(member.param, layout.unpadded(self.param[start:stop], member.param.shape))
            for parts, new in ((member.m, new_m), (member.v, new_v)):
                for suffix, whole in self.kinds.items():
                    dst, src = parts[suffix], new[suffix][start:stop]
                    if whole:
                        add(dst, layout.unpadded(src, dst.shape))
                    elif layout.columns is None:  # shared blocks' parts span the rows: `Stepper.shared_step`'s caller writes them
                        add(dst, src.view(dst.shape))
            start = stop
        for dsts, srcs in pairs.values():
            torch._foreach_copy_(dsts, srcs)


def _as_stored(new: Tensor, part: Tensor) -> Tensor:
    """A new part as its state tensor's dtype: codes that come back as a 1-byte float type (a
    compiled fp8 step's E4M3) are stored as their bits."""
    return new.view(part.dtype) if new.dtype != part.dtype and new.element_size() == part.element_size() == 1 else new


def _say(message: str, warning: bool = False) -> None:
    """Rank 0 (or the only process) tells the log."""
    if is_main_process():
        print(message, file=sys.stderr if warning else sys.stdout, flush=True)


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` (`codec_step`, `moment_statistics`), compiled: the codec, dtypes, devices and shapes
    but the row count (marked dynamic by the caller) are guarded, so each combination compiles once."""
    return torch.compile(fn, dynamic=False)


def _mark_rows_dynamic(arrays: _Arrays) -> None:
    for t in (arrays.target, arrays.grad, arrays.param, *arrays.m.values(), *arrays.v.values()):
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, 0)


class Stepper:
    """Runs buckets eagerly or compiled, and says in the log when a step compiles."""

    def __init__(self, compile: bool | None, auto: Callable[[torch.device], bool]):
        self.compile, self.auto = compile, auto
        self.decided: dict[torch.device, bool] = {}  # auto's answer per device (False where compiling failed)
        self.ran: set[torch.device] = set()  # devices where a compiled step has run

    def compiles(self, device: torch.device) -> bool:
        if self.compile is not None:
            return self.compile
        if device not in self.decided:
            self.decided[device] = self.auto(device)
        return self.decided[device]

    def step(self, codec: StateCodec, members: list[Member], hyper: dict[str, Any], bucket_numel: int | None) -> None:
        """One AdamW step of `members` (one codec, device, dtypes and step count; whole blocks);
        `bucket_numel` None: `BUCKET_NUMEL`."""
        device = members[0].target.device
        if bucket_numel is None:
            bucket_numel = BUCKET_NUMEL
        tables = codec.tables(device)
        coeffs = coefficients(device=device, **hyper) if self.compiles(device) else None
        for pieces in plan(members, codec, bucket_numel, ALONE_NUMEL.get(device.type)):
            arrays = _Arrays(pieces, codec)
            arrays.write_back(*self._run(codec_step, "step", codec, arrays, hyper, coeffs, tables, len(members)))

    def shared_statistics(self, codec: BlockCodec, member: Member, hyper: dict[str, Any]) -> tuple[Stats, Stats]:
        """The first pass over a member whose blocks other ranks share: the per-block statistics of
        its new moments, `[rows x blocks touched]` each (flat); nothing is written."""
        arrays = self._alone(codec, member)
        if arrays is None:
            return tuple({name: torch.empty(0) for name in codec.statistics} for _ in range(2))
        device = member.target.device
        coeffs = coefficients(device=device, **hyper) if self.compiles(device) else None
        stats = self._run(moment_statistics, "step's statistics", codec, arrays, hyper, coeffs, codec.tables(device), 1, with_param=False)
        return tuple({name: t.reshape(-1)[: arrays.pieces[0].rows] for name, t in moment.items()} for moment in stats)

    def shared_step(self, codec: BlockCodec, member: Member, hyper: dict[str, Any], stats: tuple[Stats, Stats]) -> None:
        """The second pass: the AdamW step, the moments encoded with the blocks' combined
        statistics (flat, as `shared_statistics` gave them); the per-block parts are the
        caller's to write."""
        arrays = self._alone(codec, member)
        if arrays is None:
            return
        pad = arrays.rows - arrays.pieces[0].rows  # the padding row of a one-row bucket
        rows = tuple({name: torch.cat([t, t[-1:].expand(pad)]).view(-1, 1) for name, t in moment.items()} for moment in stats)
        device = member.target.device
        coeffs = coefficients(device=device, **hyper) if self.compiles(device) else None
        arrays.write_back(*self._run(codec_step, "step", codec, arrays, hyper, coeffs, codec.tables(device), 1, stats=rows))

    @staticmethod
    def _alone(codec: StateCodec, member: Member) -> _Arrays | None:
        layout = Layout.of(member.target, codec.block, member.grid)
        return _Arrays([_Piece(member, layout)], codec) if layout.rows else None

    def _run(
        self, fn: Callable[..., Any], what: str, codec: StateCodec, arrays: _Arrays, hyper: dict[str, Any], coeffs: Tensor | None,
        tables: Parts, tensors: int, with_param: bool = True, **extra: Any,
    ) -> Any:
        """`fn` (`codec_step` or `moment_statistics`) on a bucket's arrays: compiled with the
        coefficient tensor `coeffs`, or eagerly where `coeffs` is None (or compiling failed)."""
        operands = (arrays.target, arrays.grad, *((arrays.param,) if with_param else ()), arrays.m, arrays.v)
        if coeffs is None or not self.compiles(arrays.target.device):
            return fn(codec, *operands, hyper, tables, **extra)
        _mark_rows_dynamic(arrays)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        began = time.perf_counter()
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                out = _compiled(fn)(codec, *operands, coeffs, tables, **extra)
        except Exception as error:  # no C++ compiler, no Triton...: eager where compiling was our choice
            device = arrays.target.device
            if self.compile is not None or device in self.ran:
                raise
            self.decided[device] = False
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            _say(f"ebb: warning: compiling the {codec.name} optimizer step failed ({type(error).__name__}: {reason}); "
                 f"it steps eagerly on {device} (optim.compile: false skips the attempt)", warning=True)
            return fn(codec, *operands, hyper, tables, **extra)
        self.ran.add(arrays.target.device)
        if torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs:
            dtypes = f"{str(arrays.target.dtype).removeprefix('torch.')} target, {str(arrays.grad.dtype).removeprefix('torch.')} gradients"
            _say(f"ebb: compiled the {codec.name} optimizer {what} ({tensors} tensors, {dtypes}, {arrays.target.device}) in {time.perf_counter() - began:.1f}s")
        return out
