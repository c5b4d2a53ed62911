"""Deterministic weighted interleaving of sources (Megatron's blending rule).

Unit n of the global stream comes from the source whose share is furthest behind its weight:
argmax_i (w_i * (n + 1) - taken_i), ties to the lower index. After any n units every source has
within one unit of w_i * n, so realised proportions track the weights exactly, with no randomness.
"""
from __future__ import annotations

import numpy as np


class Blend:
    """Which source each unit of the global stream comes from, and its index within that source."""

    def __init__(self, weights: list[float]):
        total = float(sum(weights))
        self.weights = np.array(weights, dtype=np.float64) / total
        self.position = 0  # units assigned so far
        self.taken = np.zeros(len(weights), dtype=np.int64)

    def assign(self, count: int) -> list[tuple[int, int]]:
        """The (source, index within the source) of the next `count` units."""
        out = []
        for _ in range(count):
            source = int(np.argmax(self.weights * (self.position + 1) - self.taken))
            out.append((source, int(self.taken[source])))
            self.taken[source] += 1
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"position": self.position, "taken": self.taken.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.taken = int(state["position"]), np.array(state["taken"], dtype=np.int64)


def realised_proportions(state: dict) -> list[float]:
    """The share of each source in the units a `Blend.state_dict()` has assigned."""
    return [taken / max(state["position"], 1) for taken in state["taken"]]
