"""Streams and events where the accelerator is CUDA, plain in-order copies where it is the CPU,
behind one interface, so that the interleaved schedule runs (and is tested) on either."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor


class Lane:
    """An ordered queue of copies beside the compute stream: a CUDA side stream, or (CPU) the
    calling thread itself, where every copy has finished when its call returns."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        """Work queued inside runs on this lane (after what the compute stream had queued when
        the lane was last told to `follow` it)."""
        if self.stream is None:
            yield
        else:
            with torch.cuda.stream(self.stream):
                yield

    def follow(self, event: Any | None = None) -> None:
        """Later work on this lane waits for `event` (default: what the current stream has queued)."""
        if self.stream is not None:
            self.stream.wait_event(event if event is not None else torch.cuda.current_stream(self.stream.device).record_event())

    def mark(self) -> Any | None:
        """An event after what this lane has queued so far (None on CPU: already done)."""
        return None if self.stream is None else self.stream.record_event()

    def join(self) -> None:
        """The current (compute) stream waits for this lane."""
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)


def wait(event: Any | None) -> None:
    """Block this thread until `event` (a lane's `mark`) has passed."""
    if event is not None:
        event.synchronize()


def copy(dst: Tensor, src: Tensor) -> None:
    """`dst.copy_(src)`, asynchronous where host memory is pinned and a stream is current."""
    dst.copy_(src, non_blocking=dst.device.type != src.device.type)


def host_empty(numel: int, dtype: torch.dtype, pin: bool) -> Tensor:
    """A flat host buffer, page-locked when `pin` (so that copies to and from a GPU are asynchronous)."""
    return torch.empty(numel, dtype=dtype, pin_memory=pin)
