"""The test markers, and the tiny model the tests build.

    python -m pytest -q -m "not distributed and not slow"   # the fast loop: no process spawns, nothing that takes seconds
"""
from __future__ import annotations

import json
import signal
from typing import Any

import pytest

from models.config import ModelConfig
from models.mixers import PATTERN


@pytest.fixture(autouse=True, scope="session")
def _sigint_as_in_a_shell() -> None:
    """pytest-xdist's workers ignore SIGINT, and the processes a test starts would inherit that
    (ebb keeps an inherited SIG_IGN, as a background job must): give them Ctrl-C's default."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


MARKERS = {
    "distributed": "spawns processes (gloo ranks, torchrun, the trainer under several ranks)",
    "slow": "takes seconds: end-to-end runs in subprocesses, compiles, benches (CI runs them; the fast loop skips them)",
    "cuda": "needs a CUDA device (skipped without one)",
}

# Small enough for a CPU test, with chunk sizes below the test sequence lengths (several chunks)
TINY_MIXERS: dict[str, dict[str, Any]] = {
    "attention": {"num_heads": 2},
    "mamba2": {"head_dim": 16, "d_state": 8, "chunk_size": 8},
    "deltanet": {"num_heads": 2, "chunk_size": 8},
    "gated_deltanet": {"num_heads": 2, "head_dim": 8, "chunk_size": 8},
    "rwkv7": {"head_dim": 16, "decay_rank": 8, "a_rank": 8, "v_rank": 8, "gate_rank": 8, "chunk_size": 8},
    "mom": {"num_memories": 2, "topk": 1, "num_heads": 2, "head_dim": 8, "chunk_size": 8},
    "sse": {"num_heads": 2, "head_dim": 8, "num_partitions": 2, "chunk_size": 8},
    "gated_deltaproduct": {"num_heads": 2, "head_dim": 8, "chunk_size": 8},
}

# What tensor parallelism over 2 ranks needs beyond TINY_MIXERS: head counts and groups it divides
TP2_MIXERS: dict[str, dict[str, Any]] = {
    "attention": {"num_heads": 4, "num_kv_heads": 2},
    "mamba2": {"head_dim": 8, "n_groups": 2},
    "gated_deltanet": {"num_v_heads": 4, "expand_v": 1.0},
    "rwkv7": {"head_dim": 8},
    "gated_deltaproduct": {"num_v_heads": 4, "expand_v": 1.0},
}


def every_mixer(repeats: int = 1, stages: int = 1) -> str:
    """A pattern with `repeats` blocks of every registered mixer, in table order, cut into
    `stages` equal '|'-separated stages: the generic tests cover a new mixer by its PATTERN line
    alone. With repeats 2 each mixer's later block reads what its earlier one wrote into the
    carry, across a stage cut when stages > 1."""
    blocks = "".join(PATTERN) * repeats
    if len(blocks) % stages:
        raise ValueError(f"{len(blocks)} blocks do not cut into {stages} equal stages")
    size = len(blocks) // stages
    return " | ".join(blocks[i * size : (i + 1) * size] for i in range(stages))


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


def tiny_model_config(pattern: str = "MTG*", mixers: dict[str, dict[str, Any]] | None = None, **fields: Any) -> ModelConfig:
    """d_model 32, vocabulary 64 and `TINY_MIXERS`; `mixers` updates their sections key by key,
    `fields` set the model's other keys."""
    sections = {name: {**options, **(mixers or {}).get(name, {})} for name, options in TINY_MIXERS.items()}
    return ModelConfig(**({"d_model": 32, "vocab_size": 64} | fields), pattern=pattern, mixers=sections)


def tiny_model_overrides(pattern: str = "MTG*", mixers: dict[str, dict[str, Any]] | None = None, **fields: Any) -> list[str]:
    """`tiny_model_config(...)` as `model.<key>=<value>` overrides, for a run config or the command
    line (every key that is not at its default, and the pattern)."""
    cfg = tiny_model_config(pattern, mixers, **fields)
    return [f"model.pattern={json.dumps(pattern)}"] + [f"model.{key}={json.dumps(value)}" for key, value in _flat(cfg.model_dump(exclude_defaults=True))]


def _flat(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in tree.items():
        if isinstance(value, dict):
            items += _flat(value, f"{prefix}{key}.")
        elif key != "pattern":
            items.append((f"{prefix}{key}", value))
    return items
