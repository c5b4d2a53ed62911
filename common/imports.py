"""Optional dependencies (fla, liger-kernel, Triton), imported where they are used."""
from __future__ import annotations

import functools
import importlib
from typing import Any


@functools.cache
def optional_attribute(module: str, name: str) -> Any | None:
    """`module.name`, or None where the module does not import (not installed, or a Triton or a
    driver that fails at import)."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:
        return None
