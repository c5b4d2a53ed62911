"""DCP's `FileSystemWriter`, writing each file around the page cache and checksumming it on the way.

A flush used to write each file, then read it all back to checksum it: a second pass over every
byte. Here the stream hashes what passes through it, so the manifest gets each shard's checksum
for free, and the file underneath is a `DirectFile` (checkpoint/direct_file.py) where the file
system allows.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from checkpoint.checksum import new_digest
from checkpoint.direct_file import DirectFile, open_for_writing


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
    """DCP's `FileSystemWriter`; `checksums` holds each written file's checksum once it is closed."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, sync_files=False)  # the commit fsyncs every file once (manifest.describe)
        self.fs = ShardFileSystem()

    @property
    def checksums(self) -> dict[str, str]:
        return self.fs.checksums
