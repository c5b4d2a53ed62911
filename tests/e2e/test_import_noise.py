"""Importing torchao on a machine without its CUDA extensions logs a warning per extension and torch
a deprecation per enum it registers (transformers and peft import it when they load a model): ebb's
processes drop those records (`common.imports.quiet_import_noise`), and torchao's other warnings stay."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest

import common  # noqa: F401  installs the filters


def test_the_extension_warnings_are_dropped_and_others_kept(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("torchao")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load /venv/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load this library")
        logger.warning("Failed to load /venv/torchao/_C_cutlass_90a.abi3.so: Could not load this library")
        logger.warning("another warning")
        logging.getLogger("torch.utils._pytree").warning("<enum 'KernelPreference'> is an Enum subclass and is now natively supported by ...")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]


@pytest.mark.slow
def test_importing_torchao_in_an_ebb_process_prints_nothing() -> None:
    pytest.importorskip("torchao")
    result = subprocess.run([sys.executable, "-c", "import common, torchao"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Failed to load" not in result.stderr and "Enum subclass" not in result.stderr, result.stderr
