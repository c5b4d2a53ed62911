"""Sequence mixers, one file each, declaring its config, module and MLP in a `SPEC`
(`models/spec.py`). `PATTERN` is the only place a pattern character appears: adding a
mixer is its file and one line here."""
from __future__ import annotations

from importlib import import_module

from models.spec import MixerSpec

PATTERN: dict[str, str] = {  # pattern character -> mixer name (its file, and its section under model.mixers)
    "*": "attention",
    "M": "mamba2",
    "T": "deltanet",
    "G": "gated_deltanet",
    "R": "rwkv7",
    "O": "mom",
    "S": "sse",
    "P": "gated_deltaproduct",
}

SPECS: dict[str, MixerSpec] = {name: import_module(f"models.mixers.{name}").SPEC for name in PATTERN.values()}


def spec_of(char: str) -> MixerSpec:
    if char not in PATTERN:
        raise ValueError(f"no mixer for pattern character {char!r}; known: {', '.join(PATTERN)}")
    return SPECS[PATTERN[char]]
