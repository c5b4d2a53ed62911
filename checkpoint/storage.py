"""How checkpoint bytes reach storage.

DCP's `FileSystemWriter` writes each file (`ShardWriter`) through a `DirectFile`, around the page
cache, and hashes it on the way, so the manifest gets each file's checksum without reading it back.

Checksum: XXH3-64, about 30 GB/s on one core against 4 GB/s for zlib's CRC-32, so that neither
commit nor resume's verification of a large checkpoint is slowed.

O_DIRECT: buffered writes of a 1.4 GB checkpoint cost this kind of host 0.3 to 3 s of kernel CPU
(page-cache allocation and dirty accounting, then writeback by kernel threads that run at normal
priority, taking cores from training) and fill the page cache with pages nobody reads back.
Written with O_DIRECT, the same bytes cost a steady 0.5 s, copy included. Bytes are staged in an
aligned buffer and written in whole blocks at aligned offsets; the last, partial block is written
zero-padded and the file truncated to its length, whenever the descriptor is asked for (to fsync
it) and at close.
"""
from __future__ import annotations

import errno
import mmap
import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import xxhash
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

ALGORITHM = "xxh3_64"
CHUNK = 16 << 20
ALIGN = 4096  # a multiple of every logical block size O_DIRECT may require
STAGE_BYTES = 32 << 20


def new_digest() -> xxhash.xxh3_64:
    return xxhash.xxh3_64()


def file_checksum(path: Path) -> str:
    digest = new_digest()
    chunk = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(chunk):
            digest.update(memoryview(chunk)[:n])
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_for_writing(path: Path) -> DirectFile | BinaryIO:
    """A `DirectFile` where the file system takes O_DIRECT, else an ordinary buffered file."""
    if hasattr(os, "O_DIRECT"):
        try:
            return DirectFile(path)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return open(path, "wb")


class DirectFile:
    """`write`, `tell`, `fileno`, `close` of a file opened for writing, with O_DIRECT. `flush`
    does nothing: staged bytes reach the file at `fileno()` (callers take it to fsync) and `close()`."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        self.name = str(path)
        self.stage = mmap.mmap(-1, STAGE_BYTES)  # page-aligned
        self.view = memoryview(self.stage)
        self.staged = 0  # bytes in the stage
        self.offset = 0  # where the stage's first byte goes in the file (aligned)

    def write(self, data: bytes | memoryview) -> int:
        data = memoryview(data).cast("B")
        done = 0
        while done < len(data):
            take = min(STAGE_BYTES - self.staged, len(data) - done)
            self.view[self.staged : self.staged + take] = data[done : done + take]
            self.staged += take
            done += take
            if self.staged == STAGE_BYTES:
                self._pwrite(STAGE_BYTES)
                self.offset += STAGE_BYTES
                self.staged = 0
        return done

    def tell(self) -> int:
        return self.offset + self.staged

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        self._write_tail()
        return self.fd

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self._write_tail()
        finally:
            os.close(self.fd)
            self.fd = -1
            self.view.release()
            self.stage.close()

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_tail(self) -> None:
        """The staged bytes, zero-padded to a whole block, without consuming them (later writes
        complete that block), and the file cut to its length."""
        padded = -(-self.staged // ALIGN) * ALIGN
        self.view[self.staged : padded] = bytes(padded - self.staged)
        self._pwrite(padded)
        os.ftruncate(self.fd, self.tell())

    def _pwrite(self, size: int) -> None:
        done = 0
        while done < size:
            done += os.pwrite(self.fd, self.view[done:size], self.offset + done)


class HashingStream:
    """A file open for writing that hashes every byte written through it. It has no `seek`:
    the hash is of the bytes in the order written, which is the file only if none is rewritten."""

    def __init__(self, file: DirectFile | BinaryIO):
        self.file = file
        self.digest = new_digest()

    @property
    def name(self) -> str:
        return self.file.name

    def write(self, data: bytes | memoryview) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()

    def fileno(self) -> int:
        return self.file.fileno()

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ShardFileSystem(FileSystem):
    """DCP's local file system, recording the checksum of every file it writes, by file name."""

    def __init__(self) -> None:
        super().__init__()
        self.checksums: dict[str, str] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[HashingStream | BinaryIO]:
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        stream = HashingStream(open_for_writing(Path(path)))
        try:
            yield stream
        finally:
            stream.close()
        self.checksums[Path(path).name] = stream.digest.hexdigest()

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        if (checksum := self.checksums.pop(Path(path).name, None)) is not None:
            self.checksums[Path(new_path).name] = checksum


class ShardWriter(FileSystemWriter):
    """DCP's `FileSystemWriter`; `checksums` holds each written file's checksum once it is closed.
    `file_per_tensor`: one file per tensor instead of one per rank (DCP keeps every tensor of a
    file referenced until the file is closed, so only this bounds a streamed save's memory).
    `in_plan_order`: tensors are fetched one at a time in the plan's order (where CUDA is
    available DCP otherwise fetches a few ahead, smallest first)."""

    def __init__(self, path: str | os.PathLike, file_per_tensor: bool = False, in_plan_order: bool = False):
        # the commit fsyncs every file once (manifest.describe)
        super().__init__(path, sync_files=False, single_file_per_rank=not file_per_tensor, **({"per_thread_copy_ahead": 0} if in_plan_order else {}))
        self.fs = ShardFileSystem()

    @property
    def checksums(self) -> dict[str, str]:
        return self.fs.checksums
