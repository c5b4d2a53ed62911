"""Sequence-mixing ops with fla's names, signatures and layouts.

Each chunk_* op runs fla's Triton kernel of the same name or the pure-PyTorch chunked form, as
`models.ops.dispatch.decision` says for its device, dtype and head dims (decided once per such
combination, never a kernel known to refuse or miscompile them). EBB_OPS_BACKEND=torch forces the
PyTorch form everywhere, EBB_OPS_BACKEND=fla fla's kernel wherever fla imports (on CUDA);
auto (the default) is the rule in dispatch.py. `plan_model` makes the decisions for a built model
and states them in the run's header.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from torch import nn

from models.ops import delta_rule, dispatch, gated_delta_rule, rwkv7, simple_gla
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
    "plan_model",
    "checked_decision",
]


ACTIVATIONS = frozenset({"q", "r", "k", "v", "a", "b"})  # cast under autocast; log-decays, beta and states stay float32


def autocast_activations(arguments: dict) -> dict:
    """Under CUDA autocast, the float32 activations in the autocast dtype, as a matmul would get them."""
    first = next(iter(arguments.values()))
    if not (first.is_cuda and torch.is_autocast_enabled("cuda")):
        return arguments
    dtype = torch.get_autocast_dtype("cuda")
    return {n: t.to(dtype) if n in ACTIVATIONS and isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t for n, t in arguments.items()}


def _fla_on_cuda(torch_op: Callable) -> Callable:
    """torch_op, or fla's kernel of the same name (same keyword arguments, chunk_size dropped;
    key dims padded where fla #640 asks it)."""
    names = tuple(inspect.signature(torch_op).parameters)
    known = frozenset(names)
    name = torch_op.__name__

    @functools.wraps(torch_op)
    def op(*args, **kwargs):
        given = dict(zip(names, args)) | kwargs  # not inspect's bind: Dynamo mixes up its guards across the ops
        if len(args) > len(names) or not given.keys() <= known:
            raise TypeError(f"{name}() takes {', '.join(names)}; got {', '.join(given)}")
        arguments = autocast_activations({n: given[n] for n in names if n in given})
        first_input = next(iter(arguments.values()))  # q, or r for RWKV-7
        dispatch.backend_override()  # a bad EBB_OPS_BACKEND is an error on every device
        if dispatch.record(name, arguments):  # plan_model's probe: note the shapes, run the PyTorch form
            return torch_op(**arguments)
        runs_fla, pad_key_to = dispatch.fla_padding(name, first_input)
        if runs_fla:
            return dispatch.run_fla(name, arguments, pad_key_to)
        return torch_op(**arguments)

    op.torch_op = torch_op
    return op


chunk_simple_gla = _fla_on_cuda(simple_gla.chunk_simple_gla)
chunk_delta_rule = _fla_on_cuda(delta_rule.chunk_delta_rule)
chunk_gated_delta_rule = _fla_on_cuda(gated_delta_rule.chunk_gated_delta_rule)
chunk_rwkv7 = _fla_on_cuda(rwkv7.chunk_rwkv7)


TORCH_OPS = {op.__name__: op.torch_op for op in (chunk_simple_gla, chunk_delta_rule, chunk_gated_delta_rule, chunk_rwkv7)}


def plan_model(model: nn.Module, device: torch.device, dtype: torch.dtype) -> str:
    """Decide, once, fla or PyTorch for every op `model` calls on `device` under `dtype` autocast
    (checking fla's #640 workaround on the device where it applies; on CUDA, after applying the
    tuned configs of fla's kernels for this GPU); the header's lines."""
    return dispatch.plan_model(model, device, dtype, TORCH_OPS)


def checked_decision(call: dispatch.OpCall, device: torch.device) -> dispatch.Decision:
    """What runs one op call (recorded by `dispatch.recording`, or described) on `device`, after
    its #640 start-up check where it needs one: for code that calls ops or mixers outside a model."""
    return dispatch.checked_decision(call, device, TORCH_OPS[call.op])
