"""`checkpoint.mode: lazy` (the default): DataStates-LLM's lazy, streamed checkpoint on DCP.

On request the state dict is taken (live tensors, no copy) and a `Snapshot` starts copying it
into reused host buffers; the request returns at once. Parameters and optimizer state do not
change during forward and backward, so the copy runs then: on a worker thread, on a side CUDA
stream when the tensors are on a GPU. Each tensor's copy raises its own ready flag, and the
background writer runs DCP's save on the host copy with `StreamingSavePlanner`, which hands DCP
each tensor as soon as its copy is done, so writing overlaps copying, in the ordinary DCP layout.
Training blocks only in `wait_for_snapshot`, right before the next optimizer step, if the copy
has not finished.

State that already lives in host memory for good (an offloading optimizer's `host_resident`
buffers: fp32 master and moments, the largest part of such a run's state) is not copied: the
writer reads it in place, first, subgroup by subgroup in the order the optimizer's step updates
it, and the step copies aside (or waits for) only a subgroup the writer has not read yet when it
gets there (checkpoint/resident.py).
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.planner import SavePlan, WriteItem
from torch.distributed.tensor import DTensor

from checkpoint import CheckpointError, dcp
from checkpoint.checkpointer import Checkpointer, WriteFiles
from checkpoint.resident import ResidentFlush, copy_between_host_tensors
from common.tensors import local_shard

# Test hook: seconds to sleep before writing each tensor, to make a flush slow enough to interrupt.
WRITE_DELAY_ENV = "EBB_CHECKPOINT_TEST_WRITE_DELAY"

GiB = 1 << 30


def map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """`obj` (nested dicts, lists, tuples) with every tensor replaced by `fn(tensor)`."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def tensors_of(obj: Any) -> list[Tensor]:
    """Every tensor in `obj`, in `map_tensors`' order."""
    found: list[Tensor] = []
    map_tensors(obj, found.append)
    return found


class HostBuffers:
    """Host memory for one checkpoint, at most `limit_gb` GiB per process, kept and reused while
    the tensors' shapes and dtypes stay the same; pinned when the tensors are on a GPU."""

    def __init__(self, limit_gb: float):
        self.limit_gb = limit_gb
        self.buffers: list[Tensor] = []

    def take(self, sources: list[Tensor]) -> list[Tensor]:
        need = sum(t.numel() * t.element_size() for t in sources) / GiB
        if need > self.limit_gb:
            raise CheckpointError(
                f"this process's checkpoint needs {need:.3g} GiB of host staging memory, more than checkpoint.host_buffer_gb={self.limit_gb:g}"
            )
        if [(b.shape, b.dtype) for b in self.buffers] != [(t.shape, t.dtype) for t in sources]:
            self.buffers = []  # free the old ones before allocating
            self.buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda) for t in sources]
        return self.buffers


class Snapshot:
    """Starts copying `state`'s tensors into `buffers` on `copier`; `host_state` is `state` with
    host tensors in their place (DTensors keep their sharding, with a host local tensor). Tensors
    that `in_place` holds are their own host copy, guarded by it until `written`."""

    def __init__(self, state: dict[str, Any], buffers: HostBuffers, copier: ThreadPoolExecutor, in_place: ResidentFlush | None = None):
        tensors = tensors_of(state)
        resident = {id(t) for t in tensors if in_place is not None and in_place.holds(local_shard(t))}
        sources = [t for t in tensors if id(t) not in resident]
        hosts = iter(buffers.take([local_shard(t) for t in sources]))
        self.ready: dict[int, threading.Event] = {}
        self.in_place = in_place
        if in_place is not None:
            in_place.begin(local_shard(t) for t in tensors if id(t) in resident)
        self.host_state = map_tensors(state, lambda t: t if id(t) in resident else self._host_twin(t, next(hosts)))
        self.error: BaseException | None = None
        pairs = [(local_shard(t), h) for t, h in zip(sources, buffers.buffers)]
        device = next((src.device for src, _ in pairs if src.is_cuda), None)
        start = torch.cuda.current_stream(device).record_event() if device is not None else None  # after the work queued so far
        self.done: Future = copier.submit(self._copy, pairs, list(self.ready.values()), start)

    def written(self) -> None:
        """The writer has finished with the state (written, or given up)."""
        if self.in_place is not None:
            self.in_place.end()

    def _host_twin(self, tensor: Tensor, host: Tensor) -> Tensor:
        twin = DTensor(host, tensor._spec, requires_grad=False) if isinstance(tensor, DTensor) else host
        self.ready[id(twin)] = threading.Event()
        return twin

    def _copy(self, pairs: list[tuple[Tensor, Tensor]], ready: list[threading.Event], start: Any) -> None:
        try:
            if start is None:
                for (src, host), flag in zip(pairs, ready):
                    copy_between_host_tensors(host, src)
                    flag.set()
            else:
                self._copy_from_gpu(pairs, ready, start)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            for flag in ready:  # wake any writer; it checks `error`
                flag.set()

    @staticmethod
    def _copy_from_gpu(pairs: list[tuple[Tensor, Tensor]], ready: list[threading.Event], start: torch.cuda.Event) -> None:
        """Device-to-host copies on a side stream of the tensors' GPU (this thread's current
        device is not it), after the work queued before the request."""
        device = next(src.device for src, _ in pairs if src.is_cuda)
        stream = torch.cuda.Stream(device=device)
        copied = []
        with torch.cuda.device(device), torch.cuda.stream(stream):
            stream.wait_event(start)
            for src, host in pairs:
                host.copy_(src, non_blocking=True)
                copied.append(stream.record_event())
        for event, flag in zip(copied, ready):
            event.synchronize()
            flag.set()

    def wait_for(self, host_tensor: Any) -> None:
        """Block until `host_tensor` (an object of `host_state`) holds its copy."""
        if (flag := self.ready.get(id(host_tensor))) is not None:
            flag.wait()
        if self.error is not None:
            raise CheckpointError(f"copying the state to host memory failed: {self.error}")

    def wait(self) -> None:
        """Until every copy has finished (a failed copy is reported by the checkpointer)."""
        wait([self.done])


class StreamingSavePlanner(DefaultSavePlanner):
    """DCP's default plan, with each tensor handed to the writer once its host copy is ready; the
    state read in place comes first, in the order the optimizer updates it, and is read through
    the snapshot's `ResidentFlush`."""

    def __init__(self, snapshot: Snapshot):
        super().__init__()
        self.snapshot = snapshot
        self.in_place = snapshot.in_place
        self.write_delay = float(os.environ.get(WRITE_DELAY_ENV, "0"))

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        if self.in_place is not None:
            self.plan = dataclasses.replace(plan, items=self.in_place.write_order(plan.items, self._local))
        return self.plan

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        """The items this rank writes; the resident ones another rank writes are released."""
        local = self.plan
        plan = super().finish_plan(new_plan)
        if self.in_place is not None:
            kept = {item.index for item in plan.items}
            for item in local.items:
                if item.index not in kept and isinstance(tensor := self._local(item), Tensor):
                    self.in_place.release(tensor)
        return plan

    def _local(self, item: WriteItem) -> Any:
        return self.lookup_object(item.index) if item.tensor_data is not None else None

    def resolve_data(self, write_item: WriteItem) -> Any:
        self.snapshot.wait_for(self.state_dict[write_item.index.fqn])
        if self.write_delay:
            time.sleep(self.write_delay)
        data = super().resolve_data(write_item)
        if self.in_place is not None and isinstance(data, Tensor) and self.in_place.holds(data):
            return self.in_place.read(data)
        return data


class LazyCheckpointer(Checkpointer):
    background = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffers = HostBuffers(self.settings.host_buffer_gb)
        self.copier = ThreadPoolExecutor(1, thread_name_prefix="ebb-checkpoint-copy")
        self.snapshot: Snapshot | None = None
        self.in_place: ResidentFlush | None = None

    def _stage(self, staging: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> WriteFiles:
        snapshot = Snapshot(dcp.capture_state(model, optimizer), self.buffers, self.copier, self._in_place(optimizer))
        self.snapshot = snapshot

        def write_files() -> dict[str, str]:
            try:
                return dcp.write_state(staging, snapshot.host_state, StreamingSavePlanner(snapshot), self.ranks.group, in_plan_order=True)
            finally:
                snapshot.written()

        return write_files

    def _in_place(self, optimizer: torch.optim.Optimizer) -> ResidentFlush | None:
        """The guard of `optimizer`'s host-resident state, made at its first checkpoint; None
        for an optimizer without one."""
        if not hasattr(optimizer, "host_resident"):
            return None
        if self.in_place is None or self.in_place.optimizer is not optimizer:
            self.in_place = ResidentFlush(optimizer, self.settings.staging_subgroups)
        return self.in_place

    def _stage_everywhere(self, staging: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> WriteFiles:
        """A snapshot that another rank could not stage is given up here (nothing will write it)."""
        try:
            return super()._stage_everywhere(staging, model, optimizer)
        except CheckpointError:
            if self.snapshot is not None:
                self.snapshot.written()
            raise

    def wait_for_snapshot(self) -> None:
        if self.snapshot is not None:
            snapshot, self.snapshot = self.snapshot, None
            snapshot.wait()

    def close(self) -> None:
        self.copier.shutdown()
