"""The offloaded optimizer state a lazy checkpoint writes in place, subgroup by subgroup.

An offloading optimizer (optim/offload) keeps its fp32 master weights and moments in host buffers
for good (`host_resident`); its state dict is made of views of them. A second host copy for the
checkpoint would double the memory offload exists to save, so the lazy writer reads them where
they are, before anything else and in the order the optimizer's step modifies them
(`update_order`: one element range per subgroup). Right before the step modifies a subgroup, the
optimizer's update pre-hook calls `before_update`: if the writer has not read every tensor of that
subgroup yet, the subgroup is copied aside into one of `checkpoint.staging_subgroups` reused
staging slots, and the writer reads it from there; with no slot free (or none configured) the step
waits until the writer has read the subgroup or freed a slot. Either way the checkpoint holds the
state of the step it was requested after, and the host memory it adds is those few slots.

The step therefore waits only where the writer is behind it by more than the staging slots: it
never waits for the disk while the writer keeps ahead, which it does when writing the optimizer
state takes less than a forward, backward and optimizer step.
"""
from __future__ import annotations

import bisect
import threading
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor


def copy_between_host_tensors(host: Tensor, src: Tensor) -> None:
    """`host.copy_(src)` as a plain memcpy through numpy where both are contiguous: a torch op on
    a background thread would start a second OpenMP team, whose threads slowed every later
    training step by about 20% on 2 cores for as long as the thread lived."""
    if host.is_contiguous() and src.is_contiguous():
        np.copyto(host.reshape(-1).view(torch.uint8).numpy(), src.reshape(-1).view(torch.uint8).numpy())
    else:
        host.copy_(src)


class ResidentFlush:
    """Guards `optimizer`'s host-resident buffers while a lazy checkpoint writes them (see the
    module doc). One per optimizer, reused by every checkpoint; `slots` staging slots of one
    subgroup each, allocated at first use."""

    def __init__(self, optimizer: torch.optim.Optimizer, slots: int):
        self.optimizer = optimizer
        self.buffers: list[Tensor] = list(optimizer.host_resident)
        self.buffer_of = {b.untyped_storage().data_ptr(): i for i, b in enumerate(self.buffers)}
        self.ranges: list[tuple[int, int]] = list(optimizer.update_order)
        self.order = {start: j for j, (start, _) in enumerate(self.ranges)}
        self.by_start = sorted(range(len(self.ranges)), key=lambda j: self.ranges[j][0])
        self.starts = [self.ranges[j][0] for j in self.by_start]
        self.capacity = slots
        self.slots: list[list[Tensor]] = []
        self.free: list[int] = []
        self.cond = threading.Condition()
        self.active = False
        self.pending = [0] * len(self.ranges)  # tensors overlapping each subgroup the writer has still to read
        self.reading = [0] * len(self.ranges)  # of those, being read from the live buffers now
        self.saved: list[set[int]] = [set() for _ in self.ranges]  # the buffers this checkpoint holds a part of, per subgroup
        self.staged: dict[int, int] = {}  # subgroup -> its slot
        self.stall_s = 0.0  # this checkpoint's: seconds `before_update` held the step
        self.staged_count = 0
        self.waited_count = 0
        optimizer.register_update_pre_hook(self.before_update)

    # -- the checkpoint's side ---------------------------------------------------------------------

    def holds(self, tensor: Tensor) -> bool:
        """Whether `tensor` (a plain local tensor) is a view of the resident buffers."""
        return tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr() in self.buffer_of

    def begin(self, tensors: Iterable[Tensor]) -> None:
        """A checkpoint of `tensors` (plain local tensors, the resident ones among them to be read
        once each by `read` or given up by `release`) starts."""
        with self.cond:
            if self.active:
                raise RuntimeError("a checkpoint is already writing the offloaded state")
            self.pending = [0] * len(self.ranges)
            self.saved = [set() for _ in self.ranges]
            for tensor in tensors:
                for j, _, _ in self._overlaps(tensor):
                    self.pending[j] += 1
                    self.saved[j].add(self._buffer(tensor))
            self.stall_s, self.staged_count, self.waited_count = 0.0, 0, 0
            self.active = True

    def write_order(self, items: list[Any], local: Callable[[Any], Any]) -> list[Any]:
        """`items` with those whose `local(item)` is resident first, in the order the step updates them."""
        tensors = [local(item) for item in items]
        resident = [(self._position(t), n) for n, t in enumerate(tensors) if isinstance(t, Tensor) and self.holds(t) and t.numel()]
        first = [n for _, n in sorted(resident)]
        chosen = set(first)
        return [items[n] for n in first] + [item for n, item in enumerate(items) if n not in chosen]

    def read(self, tensor: Tensor) -> Tensor:
        """A copy of `tensor` as of the checkpoint's step, from the live buffers or the staging slots."""
        out = torch.empty(tensor.shape, dtype=tensor.dtype)
        flat, b, offset = out.view(-1), self._buffer(tensor), tensor.storage_offset()
        with self.cond:
            parts = []
            for j, lo, hi in self._overlaps(tensor):
                live = j not in self.staged
                self.reading[j] += live
                parts.append((j, self._source(j, b, lo, hi), flat[lo - offset : hi - offset], live))
        try:
            for _, src, dst, _ in parts:
                copy_between_host_tensors(dst, src)
        finally:
            with self.cond:
                for j, _, _, live in parts:
                    self.reading[j] -= live
                    self._done_with(j)
                self.cond.notify_all()
        return out

    def release(self, tensor: Tensor) -> None:
        """`tensor` will not be read (another rank writes it)."""
        with self.cond:
            for j, _, _ in self._overlaps(tensor):
                self._done_with(j)
            self.cond.notify_all()

    def end(self) -> None:
        """The writer is done (or gave up): the step modifies everything freely again."""
        with self.cond:
            self.active = False
            self.pending = [0] * len(self.ranges)
            self.free.extend(self.staged.values())
            self.staged.clear()
            self.cond.notify_all()

    # -- the optimizer's side ----------------------------------------------------------------------

    def before_update(self, start: int, stop: int) -> None:
        """The step is about to modify the subgroup `start:stop`: it must be read or staged first."""
        j = self.order[start]
        with self.cond:
            if not self._in_the_way(j):
                return
            began = time.perf_counter()
            waited = False
            while self.active and self.pending[j] and j not in self.staged:
                slot = self._take_slot()
                if slot is None:
                    waited = True
                    self.cond.wait()
                    continue
                self._stage(j, slot)
            while self.active and self.reading[j]:  # reads of the live subgroup that began before it was staged
                self.cond.wait()
            self.stall_s += time.perf_counter() - began
            self.waited_count += waited

    # -- inside ------------------------------------------------------------------------------------

    def _in_the_way(self, j: int) -> bool:
        return self.active and ((self.pending[j] and j not in self.staged) or self.reading[j] > 0)

    def _buffer(self, tensor: Tensor) -> int:
        return self.buffer_of[tensor.untyped_storage().data_ptr()]

    def _position(self, tensor: Tensor) -> tuple[int, int, int]:
        """Where the step reaches `tensor`: its first subgroup's place in `update_order`, its offset, its buffer."""
        start = tensor.storage_offset()
        return self.by_start[bisect.bisect_right(self.starts, start) - 1], start, self._buffer(tensor)

    def _overlaps(self, tensor: Tensor) -> list[tuple[int, int, int]]:
        """(subgroup, first, end) element ranges of the resident buffer `tensor` covers; none if not resident."""
        if not self.holds(tensor) or not tensor.numel():
            return []
        if not tensor.is_contiguous():
            raise RuntimeError("a view of the offloaded optimizer state is not contiguous")
        first, end = tensor.storage_offset(), tensor.storage_offset() + tensor.numel()
        found = []
        for k in range(bisect.bisect_right(self.starts, first) - 1, len(self.starts)):
            j = self.by_start[k]
            lo, hi = max(first, self.ranges[j][0]), min(end, self.ranges[j][1])
            if self.ranges[j][0] >= end:
                break
            if lo < hi:
                found.append((j, lo, hi))
        return found

    def _source(self, j: int, b: int, lo: int, hi: int) -> Tensor:
        if j in self.staged:
            base = self.ranges[j][0]
            return self.slots[self.staged[j]][b][lo - base : hi - base]
        return self.buffers[b][lo:hi]

    def _done_with(self, j: int) -> None:
        self.pending[j] -= 1
        if self.pending[j] == 0 and j in self.staged:
            self.free.append(self.staged.pop(j))

    def _take_slot(self) -> int | None:
        if self.free:
            return self.free.pop()
        if len(self.slots) < self.capacity:
            numel = max(stop - start for start, stop in self.ranges)
            self.slots.append([torch.empty(numel, dtype=b.dtype) for b in self.buffers])
            return len(self.slots) - 1
        return None

    def _stage(self, j: int, slot: int) -> None:
        start, stop = self.ranges[j]
        for b in self.saved[j]:
            self.slots[slot][b][: stop - start].copy_(self.buffers[b][start:stop])
        self.staged[j] = slot
        self.staged_count += 1
