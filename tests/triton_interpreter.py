"""Triton's CPU interpreter for the tests that run fla's and liger-kernel's kernels without a GPU
(skipped unless TRITON_INTERPRET=1 and fla imports). Import this before fla: the interpreter
cannot time kernels, so each autotuned kernel keeps its first configuration."""
from __future__ import annotations

import importlib.util
import os

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("fla") is not None
needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1 and fla installed")

if INTERPRETING:  # before fla's modules are imported: their decorators build the autotuners
    import triton.runtime.autotuner as autotuner

    _init = autotuner.Autotuner.__init__

    def _first_config_only(self, fn, arg_names, configs, *args, **kwargs):
        _init(self, fn, arg_names, configs[:1], *args, **kwargs)

    autotuner.Autotuner.__init__ = _first_config_only
