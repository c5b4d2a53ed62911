"""Batches prepared ahead of training by a background thread, pinned for asynchronous copies on CUDA.

The wrapped iterator's state is snapshot right after each batch it produces; `state_dict()` is
the snapshot of the last batch training *took*, so a checkpoint never counts batches that were
only prefetched.
"""
from __future__ import annotations

import atexit
import queue
import threading
from typing import Any, Protocol

from pretrain.data.packing import Batch


class StatefulBatches(Protocol):
    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Prefetcher:
    """Wraps a stateful batch iterator with a thread that keeps up to `depth` batches ready."""

    def __init__(self, batches: StatefulBatches, depth: int, pin_memory: bool = False):
        self.batches, self.depth, self.pin_memory = batches, depth, pin_memory
        self._state = batches.state_dict()
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.batches.load_state_dict(state)
        self._state = self.batches.state_dict()

    def close(self) -> None:
        """Stop the worker; the next batch restarts it from the consumed position."""
        if self._thread is None:
            return
        atexit.unregister(self.close)
        self._stop.set()
        while self._thread.is_alive():
            self._drain()
            self._thread.join(timeout=0.01)
        self._thread = None
        self.batches.load_state_dict(self._state)

    def _start(self) -> None:
        self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
        self._thread = threading.Thread(target=self._work, name="ebb-data", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a worker still in torch code at interpreter exit aborts the process

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                batch = next(self.batches)
                if self.pin_memory:
                    batch = batch.pin_memory()
                item: Any = (batch, self.batches.state_dict())
            except BaseException as exc:  # handed to the training thread, raised there
                item = exc
            self._put(item)
            if isinstance(item, BaseException):
                return

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue
