"""Which process of a run this is."""
from __future__ import annotations

import os

import torch.distributed as dist


def is_main_process() -> bool:
    """Rank 0 under torchrun (also before the process group exists), or the only process: the one
    that reports, so that an error every rank meets is one line, not one per rank."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
