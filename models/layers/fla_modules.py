"""fla's fused Triton modules (norms, the short convolution) inside ebb's layers: used on CUDA in
eager mode when fla imports. Under torch.compile the layers stay PyTorch, for Inductor to fuse
into the block's graph; `EBB_FUSED_LAYERS=0` keeps PyTorch everywhere."""
from __future__ import annotations

import functools
import importlib
import os
from typing import Callable

import torch
from torch import Tensor


@functools.cache
def fla_function(module: str, name: str) -> Callable | None:
    """fla's `module.name`, or None where fla (or Triton) does not import."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:
        return None


def fla_layers_for(x: Tensor) -> bool:
    """Whether a layer may run fla's kernel on `x`: CUDA, half/bfloat16/float32, eager, not switched off."""
    return x.is_cuda and x.dtype != torch.float64 and not torch.compiler.is_compiling() and os.environ.get("EBB_FUSED_LAYERS", "1") != "0"
