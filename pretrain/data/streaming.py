"""Rows from a streamed source (`streaming: true`): documents read in order through `datasets`,
tokenized as they arrive, never all in memory.

The training stream is every document not held out (a seeded hash of its index picks the held-out
ones), each followed by eos, epoch after epoch in the same order; row j is its tokens
[j*seq_len, (j+1)*seq_len + 1), like packed rows of a random-access source but unshuffled. Rows
are requested in increasing order. Resuming reopens the stream at the document holding the next
row's first token (`IterableDataset.skip` reads, but does not tokenize, what it skips).
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterator

import numpy as np

from pretrain.data.documents import InMemoryDocuments, tokenize
from pretrain.data.errors import DataError
from pretrain.data.tokenizer import Tokenizer


def held_out(seed: int, index: int, val_fraction: float) -> bool:
    """Whether stream document `index` belongs to the validation split (seeded, order-free)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


class StreamedRows:
    """Rows of seq_len+1 tokens from a stream of documents; see the module docstring."""

    def __init__(self, stream: Any, key: str, tokenizer: Tokenizer, seq_len: int, seed: int, val_fraction: float, name: str):
        self.stream, self.key, self.tokenizer = stream, key, tokenizer  # a datasets.IterableDataset
        self.seq_len, self.seed, self.val_fraction, self.name = seq_len, seed, val_fraction, name
        self._seek(epoch=0, doc=0, pos=0)

    def unit(self, j: int) -> np.ndarray:
        start = j * self.seq_len
        if self._buffer and start < self._buffer[0][0]:
            raise RuntimeError(f"streamed rows are read in order: row {j} was asked for after a later one")
        self._fill_to(start + self.seq_len + 1)
        self._drop_before(start)
        tokens = np.concatenate([t for _, _, t in self._buffer])
        offset = start - self._buffer[0][0]
        return tokens[offset : offset + self.seq_len + 1]

    def state_at(self, j: int) -> dict:
        """Where row j's first token is: the epoch, the stream index of its document and the offset in it."""
        start = j * self.seq_len
        self._fill_to(start + 1)
        self._drop_before(start)
        pos, (epoch, doc), _ = self._buffer[0]
        return {"epoch": epoch, "doc": doc, "offset": start - pos}

    def restore(self, j: int, state: dict) -> None:
        self._seek(int(state["epoch"]), int(state["doc"]), j * self.seq_len - int(state["offset"]))

    def held_out_documents(self, max_tokens: int) -> InMemoryDocuments:
        """The first held-out documents, up to about `max_tokens` tokens (the validation split)."""
        texts, tokens = [], 0
        for index, text in enumerate(self._texts(self.stream)):
            if tokens >= max_tokens:
                break
            if text and held_out(self.seed, index, self.val_fraction):
                texts.append(text)
                tokens += len(text)  # an upper bound for byte tokens, close enough to stop reading
        return tokenize(self.tokenizer, texts, f"{self.name} (held out)")

    def _seek(self, epoch: int, doc: int, pos: int) -> None:
        self._epoch, self._next_doc, self._end = epoch, doc, pos
        self._buffer: list[tuple[int, tuple[int, int], np.ndarray]] = []  # (stream position, (epoch, doc), tokens)
        self._docs = self._documents_from(epoch, doc)

    def _documents_from(self, epoch: int, doc: int) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        """((epoch, index), tokens + eos) of every training document from (epoch, doc) on, forever."""
        eos = np.array([self.tokenizer.eos_id])
        while True:
            found = False
            for index, text in enumerate(self._texts(self.stream.skip(doc) if doc else self.stream), start=doc):
                if text and not held_out(self.seed, index, self.val_fraction):
                    found = True
                    yield (epoch, index), np.concatenate([self.tokenizer.encode_batch([text])[0], eos])
            if not found and doc == 0:
                raise DataError(f"data source {self.name} holds no training documents")
            epoch, doc = epoch + 1, 0

    def _texts(self, stream: Any) -> Iterator[str]:
        for example in stream:
            yield example[self.key]

    def _fill_to(self, stop: int) -> None:
        while self._end < stop:
            where, tokens = next(self._docs)
            self._buffer.append((self._end, where, tokens))
            self._end += len(tokens)

    def _drop_before(self, start: int) -> None:
        while len(self._buffer) > 1 and self._buffer[1][0] <= start:
            self._buffer.pop(0)
