"""Hugging Face weight files, written and read one tensor at a time.

Writing: the safetensors format is an 8-byte header length, a JSON header naming every tensor's
dtype, shape and byte range, then the tensors' bytes in that order. A conversion knows every
tensor's shape and dtype before it reads any (DCP's metadata), so `write_safetensors` writes the
header first and then each tensor's bytes as it arrives: the memory a conversion needs is that of
one tensor, whatever the model's size. (safetensors' own `save_file` takes every tensor of a file
at once.) Above `max_shard_bytes` the weights go into `model-0000i-of-0000n.safetensors` files
with transformers' `model.safetensors.index.json`; the files read back with safetensors' reader.

Reading: `HFWeights` opens a folder's `model.safetensors` (or its index and shards; or
`pytorch_model.bin`, memory-mapped) and returns one tensor at a time, read from the file into a
tensor of its own (not memory-mapped: pages of a mapping count as the process's memory while the
mapping lives, which would be the whole file by the end).
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
TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}


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


class SafetensorsFile:
    """One safetensors file: its header, and each tensor read into memory of its own."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        self.data_start = 8 + length
        self.entries = {name: entry for name, entry in header.items() if name != "__metadata__"}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> Tensor:
        entry = self.entries[name]
        if entry["dtype"] not in TORCH_DTYPES:
            raise ValueError(f"{self.path.name}: {name} has dtype {entry['dtype']}, which ebb does not read")
        tensor = torch.empty(self.shape(name), dtype=TORCH_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        if end - begin != tensor.numel() * tensor.element_size():
            raise ValueError(f"{self.path.name}: {name} has {end - begin} bytes for shape {self.shape(name)}")
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{self.path.name} ends inside {name}")
                done += n
        return tensor


class HFWeights:
    """A Hugging Face folder's weights, by name, read one tensor at a time."""

    def __init__(self, folder: Path):
        self.files: dict[str, Path] = {}  # tensor name -> file
        self._safetensors: dict[Path, SafetensorsFile] = {}
        self._pickled: dict[Path, dict[str, Tensor]] = {}
        if (folder / INDEX).is_file() or (folder / PICKLED_INDEX).is_file():
            index = folder / INDEX if (folder / INDEX).is_file() else folder / PICKLED_INDEX
            self.files = {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / SINGLE).is_file():
            self.files = dict.fromkeys(self._file(folder / SINGLE).entries, folder / SINGLE)
        elif (folder / PICKLED).is_file():
            self.files = dict.fromkeys(self._file(folder / PICKLED), folder / PICKLED)
        else:
            raise FileNotFoundError(f"{folder} has no {SINGLE}, {INDEX} or {PICKLED}")

    def _file(self, path: Path) -> SafetensorsFile | dict[str, Tensor]:
        if path.suffix == ".bin":
            if path not in self._pickled:
                self._pickled[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            return self._pickled[path]
        if path not in self._safetensors:
            self._safetensors[path] = SafetensorsFile(path)
        return self._safetensors[path]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._file(self.files[name])
        return file.shape(name) if isinstance(file, SafetensorsFile) else tuple(file[name].shape)

    def get(self, name: str) -> Tensor:
        file = self._file(self.files[name])
        return file.get(name) if isinstance(file, SafetensorsFile) else file[name]
