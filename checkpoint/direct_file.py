"""A write-only file that bypasses the page cache (O_DIRECT), for checkpoint shards.

Buffered writes of a 1.4 GB checkpoint cost this kind of host 0.3 to 3 s of kernel CPU (page-cache
allocation and dirty accounting, then writeback by kernel threads that run at normal priority,
taking cores from training) and fill the page cache with pages nobody reads back. Written with
O_DIRECT, the same bytes cost a steady 0.5 s, copy included. Bytes are staged in an aligned buffer
and written in whole blocks at aligned offsets; the last, partial block is written zero-padded and
the file truncated to its length, whenever the descriptor is asked for (to fsync it) and at close.
"""
from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path
from typing import BinaryIO

ALIGN = 4096  # a multiple of every logical block size O_DIRECT may require
STAGE_BYTES = 32 << 20


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
