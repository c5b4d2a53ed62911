"""Triton's CPU interpreter for the tests that run fla's and liger-kernel's kernels without a GPU
(skipped unless TRITON_INTERPRET=1 and fla imports). Import this before fla: the interpreter
cannot time kernels, so each autotuned kernel keeps its first configuration (the whole list stays
in its `all_configs`, for tests that restore it); a kernel's `for i in range(n)` gives Triton
scalars, as compiled code does (fla's chunked kernels call `i.to(...)` on them; the interpreter
would give Python ints); and fla's attention layers, which call flash-attn (CUDA only), get a
stand-in over PyTorch's SDPA."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("fla") is not None
needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1 and fla installed")

if INTERPRETING:  # before fla's modules are imported: their decorators build the autotuners
    import triton.runtime.autotuner as autotuner

    _init = autotuner.Autotuner.__init__

    def _first_config_only(self, fn, arg_names, configs, *args, **kwargs):
        _init(self, fn, arg_names, configs[:1], *args, **kwargs)
        self.all_configs = list(configs)

    autotuner.Autotuner.__init__ = _first_config_only

    import builtins

    import triton.runtime.interpreter as interpreter

    def _scalar_range(*bounds):
        for i in builtins.range(*(int(b) for b in bounds)):
            yield interpreter._implicit_cvt(i)

    class _RangePatch:
        """The kernel's module sees `_scalar_range` as `range` while the interpreter runs it."""

        def __init__(self, lang_patch, fn):
            self.lang_patch, self.namespace = lang_patch, fn.__globals__
            self.saved = self.namespace.get("range", builtins)
            self.namespace["range"] = _scalar_range

        def restore(self) -> None:
            if self.saved is builtins:
                del self.namespace["range"]
            else:
                self.namespace["range"] = self.saved
            self.lang_patch.restore()

    _patch_lang = interpreter._patch_lang
    interpreter._patch_lang = lambda fn: _RangePatch(_patch_lang(fn), fn)


def sdpa_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **_):
    """flash-attn's `flash_attn_func` ([B, T, H, D], grouped kv heads, a window of (left, 0)
    keeping keys at most `left` tokens behind the query) over SDPA."""
    T, S = q.shape[1], k.shape[1]
    distance = torch.arange(T, device=q.device)[:, None] + (S - T) - torch.arange(S, device=q.device)[None, :]
    mask = distance >= 0 if causal else torch.ones(T, S, dtype=torch.bool, device=q.device)
    if window_size[0] >= 0:
        mask &= distance <= window_size[0]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


if INTERPRETING and importlib.util.find_spec("flash_attn") is None:
    stand_in = types.ModuleType("flash_attn")
    stand_in.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    stand_in.flash_attn_func, stand_in.flash_attn_varlen_func = sdpa_flash_attn_func, None
    sys.modules["flash_attn"] = stand_in
