"""Megatron indexed token datasets (PREFIX.bin + PREFIX.idx), read with megatron-core.

The .idx is checked against the .bin before megatron-core opens them (megatron asserts, or reads
out of bounds, on a mismatch), so a bad pair is one line naming the files. A sidecar
PREFIX.ebb.json, written by `pretrain.data.preprocess`, records the tokenizer; without one the
largest token id is found by a scan.
"""
from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np

from common.errors import first_line
from pretrain.data.errors import DataError

INDEX_HEADER = b"MMIDIDX\x00\x00"
HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence and document counts
# megatron-core's DType codes (megatron/core/datasets/indexed_dataset.py)
DTYPE_BY_CODE = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def megatron_indexed() -> ModuleType:
    """megatron-core's indexed_dataset module (a heavy import, done only for indexed data, without
    the warnings megatron-core prints about optional GPU packages)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def sidecar_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.ebb.json")


def is_indexed_prefix(path: str) -> bool:
    return Path(f"{path}.idx").is_file() or Path(f"{path}.bin").is_file()


def strip_indexed_suffix(path: str) -> str:
    """`data/x.bin` or `data/x.idx` name the prefix `data/x`."""
    return path[:-4] if path.endswith((".bin", ".idx")) else path


class IndexedDocuments:
    """The documents of a Megatron indexed dataset (a document may span several sequences,
    which are contiguous in the .bin), memory-mapped by megatron-core's `IndexedDataset`."""

    def __init__(self, prefix: str):
        check_index_matches_bin(prefix)
        try:
            self.dataset = megatron_indexed().IndexedDataset(prefix, mmap=True)
        except (AssertionError, ValueError, OSError) as exc:
            raise DataError(f"data source {prefix}: megatron-core cannot read it: {first_line(exc)}") from exc
        self.name = prefix
        seq_lengths = self.dataset.sequence_lengths.astype(np.int64)
        doc_bounds = np.asarray(self.dataset.document_indices, dtype=np.int64)
        self.first_sequence = doc_bounds[:-1]
        self.lengths = np.add.reduceat(seq_lengths, self.first_sequence) if len(self.first_sequence) else np.zeros(0, np.int64)
        self.lengths[doc_bounds[1:] == doc_bounds[:-1]] = 0  # reduceat gives an empty document its next sequence's length

    def read(self, doc: int, offset: int, count: int) -> np.ndarray:
        # `get` reads `count` tokens from the sequence's pointer on: through the document's later sequences
        return self.dataset.get(int(self.first_sequence[doc]), offset, count)

    def max_token(self) -> int:
        """The largest token id (a scan of the whole .bin)."""
        data = np.memmap(f"{self.name}.bin", dtype=self.dataset.index.dtype, mode="r")
        return int(data.max()) if len(data) else -1


def check_index_matches_bin(prefix: str) -> None:
    """Header, counts and sequence pointers of PREFIX.idx agree with the size of PREFIX.bin."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise DataError(f"data source {prefix}: {path} does not exist (an indexed dataset needs {prefix}.bin and {prefix}.idx)")
    raw = idx.read_bytes()
    if len(raw) < HEADER_BYTES or raw[: len(INDEX_HEADER)] != INDEX_HEADER:
        raise DataError(f"data source {prefix}: {idx} is not a Megatron index (bad header)")
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", raw, len(INDEX_HEADER))
    if version != 1 or code not in DTYPE_BY_CODE:
        raise DataError(f"data source {prefix}: {idx} has unknown version {version} or dtype code {code}")
    needed = HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
    if len(raw) < needed:
        raise DataError(f"data source {prefix}: {idx} is truncated ({len(raw)} bytes, its counts need {needed})")
    lengths = np.frombuffer(raw, np.int32, n_seq, HEADER_BYTES).astype(np.int64)
    pointers = np.frombuffer(raw, np.int64, n_seq, HEADER_BYTES + 4 * n_seq)
    itemsize = np.dtype(DTYPE_BY_CODE[code]).itemsize
    expected = np.concatenate([[0], np.cumsum(lengths * itemsize)])
    if not np.array_equal(pointers, expected[:-1]) or expected[-1] != bin_.stat().st_size:
        raise DataError(
            f"data source {prefix}: {idx} does not match {bin_} (index describes {expected[-1]} bytes, the .bin has "
            f"{bin_.stat().st_size}); rebuild both with python -m pretrain.data.preprocess"
        )


def read_sidecar(prefix: str) -> dict | None:
    path = sidecar_path(prefix)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"data source {prefix}: {path} is not valid JSON: {exc}") from exc


def write_sidecar(prefix: str, tokenizer_spec: str, vocab_size: int, eos_id: int, documents: int, tokens: int) -> None:
    info = {"tokenizer": tokenizer_spec, "vocab_size": vocab_size, "eos_id": eos_id, "documents": documents, "tokens": tokens}
    sidecar_path(prefix).write_text(json.dumps(info, indent=1) + "\n")


def check_indexed_vocab(docs: IndexedDocuments, eos_id: int, model_vocab_size: int) -> None:
    """The dataset's tokens fit the model's vocabulary and its documents end with our eos."""
    info = read_sidecar(docs.name)
    if info is not None:
        if info["vocab_size"] > model_vocab_size:
            raise DataError(
                f"data source {docs.name} was tokenized with {info['tokenizer']} ({info['vocab_size']} tokens) "
                f"but model.vocab_size is {model_vocab_size}; set model.vocab_size >= {info['vocab_size']}"
            )
        if info["eos_id"] != eos_id:
            raise DataError(f"data source {docs.name} ends documents with token {info['eos_id']} but data.tokenizer's eos is {eos_id}")
        return
    largest = docs.max_token()
    if largest >= model_vocab_size:
        raise DataError(f"data source {docs.name} holds token id {largest} but model.vocab_size is {model_vocab_size}")
    first = int(np.flatnonzero(docs.lengths)[0])
    if docs.read(first, int(docs.lengths[first]) - 1, 1)[0] != eos_id:
        raise DataError(f"data source {docs.name}: documents do not end with data.tokenizer's eos ({eos_id}); preprocess with an end-of-document token")
