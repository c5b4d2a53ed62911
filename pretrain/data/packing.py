"""Packing a source's documents into training units, and units into batches.

A source's training documents are reshuffled every epoch (seed + epoch) and concatenated. Two
kinds of unit are cut from that stream:
- rows: unit r is the seq_len+1 stream tokens from r*seq_len (consecutive rows overlap by one,
  so no token is lost); the stream tail that does not fill a row is dropped each epoch.
- varlen packs: whole documents in epoch order, greedily, while they fit `budget`+1 tokens (a
  longer document is cut into pieces of that size). A pack is one padding-free row.
Either way unit j of a source is a pure function of (seed, j): any rank computes any unit.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from pretrain.data.documents import Documents
from pretrain.loss import IGNORE_INDEX


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T] long; IGNORE_INDEX where the input is eos (the label would start the next document)
    cu_seqlens: torch.Tensor  # int32 [n+1]: document starts over the flattened B*T tokens, every row start, then B*T

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.input_ids, self.labels, self.cu_seqlens)))

    def pin_memory(self) -> "Batch":
        return Batch(self.input_ids.pin_memory(), self.labels.pin_memory(), self.cu_seqlens.pin_memory())


def make_batch(units: list[np.ndarray], eos_id: int) -> Batch:
    """A batch of equal-length units (each row's inputs are its tokens but the last, labels all but
    the first). Built in numpy: torch ops here would start a second OpenMP team beside training's."""
    tokens = np.stack(units).astype(np.int64)
    input_ids, labels = np.ascontiguousarray(tokens[:, :-1]), tokens[:, 1:].copy()
    labels[input_ids == eos_id] = IGNORE_INDEX
    return Batch(torch.from_numpy(input_ids), torch.from_numpy(labels), torch.from_numpy(document_starts(input_ids, eos_id)))


def document_starts(input_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """int32 cu_seqlens over the flattened rows: every row start, every token after an eos, the end."""
    rows, seq_len = input_ids.shape
    after_eos = np.flatnonzero(input_ids.reshape(-1) == eos_id) + 1
    return np.union1d(np.arange(0, rows * seq_len + 1, seq_len), after_eos).astype(np.int32)


def epoch_order(doc_ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed + epoch)
    return doc_ids[torch.randperm(len(doc_ids), generator=generator).numpy()]


def read_span(docs: Documents, order: np.ndarray, ends: np.ndarray, start: int, count: int) -> np.ndarray:
    """`count` tokens from position `start` of the concatenation of documents `order` (cumulative ends `ends`)."""
    parts, pos, stop = [], start, start + count
    k = int(np.searchsorted(ends, pos, side="right"))
    while pos < stop:
        doc_start = int(ends[k - 1]) if k else 0
        take = min(stop, int(ends[k])) - pos
        parts.append(docs.read(int(order[k]), pos - doc_start, take))
        pos, k = pos + take, k + 1
    return np.concatenate(parts)


class PackedRows:
    """Rows of seq_len+1 tokens from a source's documents `doc_ids`, epoch after epoch."""

    def __init__(self, docs: Documents, doc_ids: np.ndarray, seq_len: int, seed: int):
        self.docs, self.doc_ids, self.seq_len, self.seed = docs, doc_ids, seq_len, seed
        self.rows_per_epoch = max(int(docs.lengths[doc_ids].sum()) - 1, 0) // seq_len

    def unit(self, j: int) -> np.ndarray:
        epoch, row = divmod(j, self.rows_per_epoch)
        order, ends = self._epoch(epoch)
        return read_span(self.docs, order, ends, row * self.seq_len, self.seq_len + 1)

    @lru_cache(maxsize=2)
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = epoch_order(self.doc_ids, self.seed, epoch)
        return order, np.cumsum(self.docs.lengths[order])


class VarlenPacks:
    """Padding-free packs of whole documents (at most `budget`+1 tokens), epoch after epoch."""

    def __init__(self, docs: Documents, doc_ids: np.ndarray, budget: int, seed: int):
        self.docs, self.doc_ids, self.budget, self.seed = docs, doc_ids, budget, seed
        self._first_pack = [0]  # the global index of each computed epoch's first pack, then the next epoch's

    def unit(self, j: int) -> np.ndarray:
        epoch = self._epoch_of(j)
        order, ends, pack_starts = self._epoch(epoch)
        p = j - self._first_pack[epoch]
        start, stop = int(pack_starts[p]), int(pack_starts[p + 1])
        return read_span(self.docs, order, ends, start, stop - start)

    def _epoch_of(self, j: int) -> int:
        while self._first_pack[-1] <= j:
            epoch = len(self._first_pack) - 1
            self._first_pack.append(self._first_pack[-1] + len(self._epoch(epoch)[2]) - 1)
        return int(np.searchsorted(self._first_pack, j, side="right")) - 1

    @lru_cache(maxsize=2)
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch's document order, cumulative ends, and pack boundaries (stream positions)."""
        order = epoch_order(self.doc_ids, self.seed, epoch)
        ends = np.cumsum(self.docs.lengths[order])
        return order, ends, greedy_pack_starts(self.docs.lengths[order], self.budget + 1)


def greedy_pack_starts(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Stream positions where packs start (then the end): whole documents while they fit
    `capacity` tokens; a longer document is cut into `capacity`-token pieces of its own. No pack
    has fewer than 2 tokens (a 1-token remainder joins the next document; at the end it is dropped)."""
    starts, pos, used = [0], 0, 0
    for n in lengths.tolist():
        if used + n > capacity:
            if used == 1:
                pos, n, used = pos - 1, n + 1, 0
            elif used:
                starts.append(pos)
                used = 0
        while n > capacity:
            pos, n = pos + capacity, n - capacity
            starts.append(pos)
        pos, used = pos + n, used + n
        if used == capacity:
            starts.append(pos)
            used = 0
    if used == 1:
        pos -= 1
    elif used:
        starts.append(pos)
    return np.array(starts if starts[-1] == pos else starts + [pos], dtype=np.int64)
