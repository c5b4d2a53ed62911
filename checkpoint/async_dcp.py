"""`checkpoint.mode: async`: torch DCP's `async_save`, the baseline lazy mode is measured against.

The state is staged by a DCP `DefaultStager` (pinned, on a worker thread and a side stream on
CUDA; a blocking copy on CPU, where DCP offers no async staging); DCP's thread then uploads it
over the checkpoint's own gloo group, and ours commits. Each save gets its own stager, closed once
its upload is done: with torch 2.11 on CUDA, a stager reused for a second save failed it
(KeyError in its deep copy, whose dispatch table `close()` clears).
"""
from __future__ import annotations

import warnings
from concurrent.futures import Future
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from checkpoint import dcp
from checkpoint.checkpointer import Checkpointer, WriteFiles


class AsyncCheckpointer(Checkpointer):
    background = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.staged: Future | None = None
        if self.ranks.group is None:  # DCP's upload thread warns on every save in one process
            warnings.filterwarnings("ignore", message=dcp.SINGLE_PROCESS_WARNING)

    def _stage(self, staging: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> WriteFiles:
        stager = new_stager()
        self.staged, uploaded, writer = dcp.start_async_write(staging, dcp.capture_state(model, optimizer), stager, self.ranks.group)

        def finish_upload() -> dict[str, str]:
            try:
                with dcp.write_errors(staging):
                    uploaded.result()
            finally:
                stager.close()
            return writer.checksums

        return finish_upload

    def wait_for_snapshot(self) -> None:
        if self.staged is not None:
            self.staged.result()
            self.staged = None


def new_stager() -> DefaultStager:
    cuda = torch.cuda.is_available()
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=cuda, use_non_blocking_copy=cuda))
