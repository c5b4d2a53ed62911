"""Sequence-mixing ops with fla's names, signatures and layouts.

On CUDA, when flash-linear-attention (fla) is importable, each chunk_* op calls fla's Triton
kernel of the same name; otherwise the pure-PyTorch chunked form runs. EBB_OPS_BACKEND=torch
forces the pure-PyTorch form everywhere (EBB_OPS_BACKEND=auto, the default, is the rule above).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import os
from typing import Callable

from models.ops import delta_rule, gated_delta_rule, rwkv7, simple_gla
from models.ops.recurrent import (
    recurrent_delta_rule,
    recurrent_gated_delta_rule,
    recurrent_rwkv7,
    recurrent_simple_gla,
)

__all__ = [
    "chunk_simple_gla",
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "chunk_rwkv7",
    "recurrent_simple_gla",
    "recurrent_delta_rule",
    "recurrent_gated_delta_rule",
    "recurrent_rwkv7",
]


@functools.cache
def _fla_kernel(module: str, name: str) -> Callable | None:
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None


def _use_torch_backend() -> bool:
    backend = os.environ.get("EBB_OPS_BACKEND", "auto")
    if backend not in ("auto", "torch"):
        raise ValueError(f"EBB_OPS_BACKEND must be 'auto' or 'torch', got {backend!r}")
    return backend == "torch"


def _fla_on_cuda(torch_op: Callable, fla_module: str) -> Callable:
    """torch_op, or fla's kernel of the same name (same keyword arguments, chunk_size dropped)."""
    signature = inspect.signature(torch_op)

    @functools.wraps(torch_op)
    def op(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        first_input = next(iter(arguments.values()))  # q, or r for RWKV-7
        if not _use_torch_backend() and first_input.is_cuda:
            fla_op = _fla_kernel(fla_module, torch_op.__name__)
            if fla_op is not None:
                arguments.pop("chunk_size", None)
                return fla_op(**arguments)
        return torch_op(*args, **kwargs)

    return op


chunk_simple_gla = _fla_on_cuda(simple_gla.chunk_simple_gla, "fla.ops.simple_gla")
chunk_delta_rule = _fla_on_cuda(delta_rule.chunk_delta_rule, "fla.ops.delta_rule")
chunk_gated_delta_rule = _fla_on_cuda(gated_delta_rule.chunk_gated_delta_rule, "fla.ops.gated_delta_rule")
chunk_rwkv7 = _fla_on_cuda(rwkv7.chunk_rwkv7, "fla.ops.rwkv7")
