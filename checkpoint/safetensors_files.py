"""Hugging Face weight files, written and read one tensor at a time.

Writing: the safetensors format is an 8-byte header length, a JSON header naming every tensor's
dtype, shape and byte range, then the tensors' bytes in that order. A conversion knows every
tensor's shape and dtype before it reads any (DCP's metadata), so `write_safetensors` writes the
header first and then each tensor's bytes as it arrives: the memory a conversion needs is that of
one tensor, whatever the model's size. (safetensors' own `save_file` takes every tensor of a file
at once.) Above `max_shard_bytes` the weights go into `model-0000i-of-0000n.safetensors` files
with transformers' `model.safetensors.index.json`; the files read back with safetensors' reader.

Reading: `HFWeights` opens a folder's `model.safetensors` (or its index and shards; or
`pytorch_model.bin`, memory-mapped) and returns one tensor at a time.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLED = "pytorch_model.bin"
PICKLED_INDEX = "pytorch_model.bin.index.json"
DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n * torch.empty((), dtype=self.dtype).element_size()


def shard_plan(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Consecutive groups of at most `max_shard_bytes` (a larger tensor gets a file of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _header(entries: list[Entry]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": DTYPES[entry.dtype], "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


def _write_shard(path: Path, entries: list[Entry], tensors: Iterator[tuple[str, Tensor]]) -> None:
    with open(path, "wb") as f:
        f.write(_header(entries))
        for entry in entries:
            name, tensor = next(tensors)
            if name != entry.name or tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
                raise ValueError(f"expected {entry.name} {entry.shape} {entry.dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
            f.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def write_safetensors(folder: Path, entries: list[Entry], tensors: Iterator[tuple[str, Tensor]], max_shard_bytes: int) -> list[str]:
    """Write `tensors` ((name, tensor) in the order of `entries`) into `folder`; the file names."""
    shards = shard_plan(entries, max_shard_bytes)
    if len(shards) == 1:
        _write_shard(folder / SINGLE, shards[0], tensors)
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _write_shard(folder / name, shard, tensors)
    index = {
        "metadata": {"total_size": sum(e.nbytes for e in entries)},
        "weight_map": {e.name: name for name, shard in zip(names, shards) for e in shard},
    }
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX]


class HFWeights:
    """A Hugging Face folder's weights, by name, read one tensor at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, Path] = {}  # tensor name -> file
        self._open: dict[Path, object] = {}  # safetensors files, opened (memory-mapped) once
        self._open_pickled: dict[Path, dict[str, Tensor]] = {}
        if (folder / INDEX).is_file() or (folder / PICKLED_INDEX).is_file():
            index = folder / INDEX if (folder / INDEX).is_file() else folder / PICKLED_INDEX
            self.files = {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / SINGLE).is_file():
            self.files = dict.fromkeys(self._safetensors_names(folder / SINGLE), folder / SINGLE)
        elif (folder / PICKLED).is_file():
            self.files = dict.fromkeys(self._pickled(folder / PICKLED), folder / PICKLED)
        else:
            raise FileNotFoundError(f"{folder} has no {SINGLE}, {INDEX} or {PICKLED}")

    @staticmethod
    def _safetensors_names(path: Path) -> list[str]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())

    def _pickled(self, path: Path) -> dict[str, Tensor]:
        if path not in self._open_pickled:
            self._open_pickled[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._open_pickled[path]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def _handle(self, path: Path):
        if path not in self._open:
            from safetensors import safe_open

            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        path = self.files[name]
        if path.suffix == ".bin":
            return tuple(self._pickled(path)[name].shape)
        return tuple(self._handle(path).get_slice(name).get_shape())

    def get(self, name: str) -> Tensor:
        path = self.files[name]
        if path.suffix == ".bin":
            return self._pickled(path)[name]
        return self._handle(path).get_tensor(name)
