"""Optional dependencies (fla, liger-kernel, Triton), imported where they are used, and the noise
some of them make at import."""
from __future__ import annotations

import functools
import importlib
import logging
import re
from typing import Any


@functools.cache
def optional_attribute(module: str, name: str) -> Any | None:
    """`module.name`, or None where the module does not import (not installed, or a Triton or a
    driver that fails at import)."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:
        return None


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_import_noise() -> None:
    """Drop the log records that importing torchao writes on a machine without its CUDA
    extensions (transformers and peft import it when they load a model; ebb's benches compare
    against it): a "Failed to load ....so" warning per extension, and torch's deprecation notice
    for two enums torchao registers. Nothing ebb or its user can act on; torchao's other warnings
    stay. Filters only: nothing is imported here."""
    logging.getLogger("torchao").addFilter(_DropMessages(r"^Failed to load .*\.so\b"))
    logging.getLogger("torch.utils._pytree").addFilter(_DropMessages(r"is an Enum subclass and is now natively supported"))
