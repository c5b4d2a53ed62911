"""`checkpoint.mode: lazy` (the default): DataStates-LLM's lazy, streamed checkpoint on DCP.

On request the state dict is taken (live tensors, no copy) and a `Snapshot` starts copying it
into reused host buffers; the request returns at once. Parameters and optimizer state do not
change during forward and backward, so the copy runs then: on a worker thread, on a side CUDA
stream when the tensors are on a GPU. Each tensor's copy raises its own ready flag, and the
background writer runs DCP's save on the host copy with `StreamingSavePlanner`, which hands DCP
each tensor as soon as its copy is done, so writing overlaps copying, in the ordinary DCP layout.
Training blocks only in `wait_for_snapshot`, right before the next optimizer step, if the copy
has not finished.
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

# Test hook: seconds to sleep before writing each tensor, to make a flush slow enough to interrupt.
WRITE_DELAY_ENV = "EBB_CHECKPOINT_TEST_WRITE_DELAY"

GiB = 1 << 30


def local_part(tensor: Tensor) -> Tensor:
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """`obj` (nested dicts, lists, tuples) with every tensor replaced by `fn(tensor)`."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


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


class Snapshot:
    """Starts copying `state`'s tensors into `buffers` on `copier`; `host_state` is `state` with
    host tensors in their place (DTensors keep their sharding, with a host local tensor)."""

    def __init__(self, state: dict[str, Any], buffers: HostBuffers, copier: ThreadPoolExecutor):
        sources: list[Tensor] = []
        map_tensors(state, sources.append)
        hosts = iter(buffers.take([local_part(t) for t in sources]))
        self.ready: dict[int, threading.Event] = {}
        self.host_state = map_tensors(state, lambda t: self._host_twin(t, next(hosts)))
        self.error: BaseException | None = None
        pairs = [(local_part(t), h) for t, h in zip(sources, buffers.buffers)]
        device = next((src.device for src, _ in pairs if src.is_cuda), None)
        start = torch.cuda.current_stream(device).record_event() if device is not None else None  # after the work queued so far
        self.done: Future = copier.submit(self._copy, pairs, list(self.ready.values()), start)

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
        """Until every copy has finished (a failed copy is reported by the write that needed it)."""
        wait([self.done])


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
        snapshot = Snapshot(dcp.capture_state(model, optimizer), self.buffers, self.copier)
        self.snapshot = snapshot
        return lambda: dcp.write_state(staging, snapshot.host_state, StreamingSavePlanner(snapshot), self.ranks.group)

    def wait_for_snapshot(self) -> None:
        if self.snapshot is not None:
            snapshot, self.snapshot = self.snapshot, None
            snapshot.wait()

    def close(self) -> None:
        self.copier.shutdown()
