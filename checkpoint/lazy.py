"""`checkpoint.mode: lazy` (the default): DataStates-LLM's lazy, streamed checkpoint on DCP.

On request the state dict is taken (live tensors, no copy) and a `Snapshot` starts copying it
into reused host buffers; the request returns at once. The background writer runs DCP's save
on the host copy with `StreamingSavePlanner`, which hands DCP each tensor as soon as its copy is
done, so writing overlaps copying, in the ordinary DCP layout. Training blocks only in
`wait_for_snapshot`, right before the next optimizer step, if the copy has not finished.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem

from checkpoint import dcp
from checkpoint.checkpointer import Checkpointer, WriteFiles
from checkpoint.snapshot import HostBuffers, Snapshot

# Test hook: seconds to sleep before writing each tensor, to make a flush slow enough to interrupt.
WRITE_DELAY_ENV = "EBB_CHECKPOINT_TEST_WRITE_DELAY"


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
