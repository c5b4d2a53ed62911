"""checkpoint/storage.py's DirectFile: O_DIRECT writes through an aligned stage give back exactly the bytes
written, whatever the sizes of the writes, and fall back to a buffered file where O_DIRECT is refused."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from checkpoint import storage
from checkpoint.storage import ALIGN, DirectFile, open_for_writing

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")


@pytest.fixture
def small_stage(monkeypatch):
    monkeypatch.setattr(storage, "STAGE_BYTES", 4 * ALIGN)  # writes cross many stage boundaries


def chunks(data: bytes, sizes: list[int]):
    start = 0
    for size in sizes:
        yield data[start : start + size]
        start += size


def test_odd_writes_give_back_the_bytes_and_the_length(tmp_path, small_stage):
    data = np.random.default_rng(0).integers(0, 256, 10 * ALIGN + 123, dtype=np.uint8).tobytes()
    sizes = [1, 4095, 7, 3 * ALIGN, 5000, 1, ALIGN, len(data)]
    written = 0
    with DirectFile(tmp_path / "f") as f:
        for piece in chunks(data, sizes):
            assert f.write(memoryview(piece)) == len(piece)
            written += len(piece)
            assert f.tell() == written
    assert written == len(data)
    assert (tmp_path / "f").read_bytes() == data


def test_fileno_makes_the_written_bytes_whole_and_later_writes_continue(tmp_path, small_stage):
    f = DirectFile(tmp_path / "f")
    f.write(b"a" * 5000)
    os.fsync(f.fileno())  # as DCP does before closing
    assert (tmp_path / "f").read_bytes() == b"a" * 5000
    f.write(b"b" * 20000)
    f.close()
    f.close()  # a second close does nothing
    assert (tmp_path / "f").read_bytes() == b"a" * 5000 + b"b" * 20000


def test_an_empty_file_stays_empty(tmp_path):
    DirectFile(tmp_path / "f").close()
    assert (tmp_path / "f").read_bytes() == b""


def test_a_file_system_without_o_direct_gets_a_buffered_file(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    with open_for_writing(tmp_path / "f") as f:
        assert not isinstance(f, DirectFile)
        f.write(b"xyz")
    assert (tmp_path / "f").read_bytes() == b"xyz"


def test_other_open_errors_are_raised(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_for_writing(tmp_path / "missing-dir" / "f")
