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
writer reads it in place, and the next optimizer step waits until it is written. A second host
copy of it would double the memory offload exists to save.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem
from torch.distributed.tensor import DTensor

from checkpoint import CheckpointError, dcp
from checkpoint.checkpointer import Checkpointer, WriteFiles
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


def copy_between_host_tensors(host: Tensor, src: Tensor) -> None:
    """`host.copy_(src)` as a plain memcpy through numpy where both are contiguous: a torch op on
    this background thread would start a second OpenMP team, whose threads slowed every later
    training step by about 20% on 2 cores for as long as the thread lived."""
    if host.is_contiguous() and src.is_contiguous():
        np.copyto(host.reshape(-1).view(torch.uint8).numpy(), src.reshape(-1).view(torch.uint8).numpy())
    else:
        host.copy_(src)


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


def resident_storages(optimizer: torch.optim.Optimizer) -> set[int]:
    """The storages of `optimizer`'s state that live in host memory for good (see the module doc)."""
    return {t.untyped_storage().data_ptr() for t in getattr(optimizer, "host_resident", ())}


class Snapshot:
    """Starts copying `state`'s tensors into `buffers` on `copier`; `host_state` is `state` with
    host tensors in their place (DTensors keep their sharding, with a host local tensor). Tensors
    on the storages in `in_place` are their own host copy; `persisted` is set once the writer has
    read them (`written`)."""

    def __init__(self, state: dict[str, Any], buffers: HostBuffers, copier: ThreadPoolExecutor, in_place: set[int] = frozenset()):
        tensors = tensors_of(state)
        resident = {id(t) for t in tensors if self._resident(t, in_place)}
        sources = [t for t in tensors if id(t) not in resident]
        hosts = iter(buffers.take([local_shard(t) for t in sources]))
        self.ready: dict[int, threading.Event] = {}
        self.reads_in_place = bool(resident)
        self.persisted = threading.Event()
        self.host_state = map_tensors(state, lambda t: t if id(t) in resident else self._host_twin(t, next(hosts)))
        self.error: BaseException | None = None
        pairs = [(local_shard(t), h) for t, h in zip(sources, buffers.buffers)]
        device = next((src.device for src, _ in pairs if src.is_cuda), None)
        start = torch.cuda.current_stream(device).record_event() if device is not None else None  # after the work queued so far
        self.done: Future = copier.submit(self._copy, pairs, list(self.ready.values()), start)

    @staticmethod
    def _resident(tensor: Tensor, in_place: set[int]) -> bool:
        local = local_shard(tensor)
        return local.device.type == "cpu" and local.untyped_storage().data_ptr() in in_place

    def written(self) -> None:
        """The writer has finished with the state (written, or given up)."""
        self.persisted.set()

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
        """Until every copy has finished, and the state read in place is written (a failed copy
        or write is reported by the checkpointer)."""
        wait([self.done])
        if self.reads_in_place:
            self.persisted.wait()


class StreamingSavePlanner(DefaultSavePlanner):
    """DCP's default plan, with each tensor handed to the writer once its host copy is ready."""

    def __init__(self, snapshot: Snapshot):
        super().__init__()
        self.snapshot = snapshot
        self.write_delay = float(os.environ.get(WRITE_DELAY_ENV, "0"))

    def resolve_data(self, write_item: WriteItem) -> Any:
        self.snapshot.wait_for(self.state_dict[write_item.index.fqn])
        if self.write_delay:
            time.sleep(self.write_delay)
        return super().resolve_data(write_item)


class LazyCheckpointer(Checkpointer):
    background = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffers = HostBuffers(self.settings.host_buffer_gb)
        self.copier = ThreadPoolExecutor(1, thread_name_prefix="ebb-checkpoint-copy")
        self.snapshot: Snapshot | None = None

    def _stage(self, staging: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> WriteFiles:
        snapshot = Snapshot(dcp.capture_state(model, optimizer), self.buffers, self.copier, resident_storages(optimizer))
        self.snapshot = snapshot

        def write_files() -> dict[str, str]:
            try:
                return dcp.write_state(staging, snapshot.host_state, StreamingSavePlanner(snapshot), self.ranks.group)
            finally:
                snapshot.written()

        return write_files

    def wait_for_snapshot(self) -> None:
        if self.snapshot is not None:
            snapshot, self.snapshot = self.snapshot, None
            snapshot.wait()

    def close(self) -> None:
        self.copier.shutdown()
