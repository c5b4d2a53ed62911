"""fla's fused Triton modules (norms, the short convolution, SwiGLU's product) inside ebb's layers:
used on CUDA in eager mode when fla imports. Under torch.compile the layers stay PyTorch, for
Inductor to fuse into the block's graph; `EBB_FUSED_LAYERS=0` keeps PyTorch everywhere."""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor

from common.imports import optional_attribute
from models.ops import dispatch


def fla_layers_for(x: Tensor) -> bool:
    """Whether a layer may run fla's kernel on `x`: CUDA, half/bfloat16/float32, eager, not switched
    off, not in the ops' start-up probe (`dispatch.is_recording`)."""
    return (x.is_cuda and x.dtype != torch.float64 and not torch.compiler.is_compiling()
            and os.environ.get("EBB_FUSED_LAYERS", "1") != "0" and not dispatch.is_recording())


def fla_kernel_for(x: Tensor, module: str, name: str) -> Callable | None:
    """fla's `module.name` where a layer may run it on `x` (`fla_layers_for`) and fla imports, else None."""
    return optional_attribute(module, name) if fla_layers_for(x) else None
