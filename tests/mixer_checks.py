"""Checks every mixer must pass, shared by the per-mixer test files (each builds its own fixture)."""
from __future__ import annotations

import torch
from torch import nn

# Small sizes for one-block mixer tests in float64: chunk sizes below the test lengths (several chunks)
SMALL_MIXERS = {
    "attention": {"num_heads": 4, "num_kv_heads": 2},
    "mamba2": {"d_state": 8, "head_dim": 8, "chunk_size": 4},
    "deltanet": {"num_heads": 2, "chunk_size": 4},
    "gated_deltanet": {"num_heads": 2, "head_dim": 8, "chunk_size": 4},
    "rwkv7": {"head_dim": 8, "chunk_size": 4},
    "mom": {"num_heads": 2, "head_dim": 8, "chunk_size": 4},
    "sse": {"num_heads": 2, "head_dim": 8, "chunk_size": 4},
    "gated_deltaproduct": {"num_heads": 2, "head_dim": 8, "chunk_size": 4},
}


def assert_close64(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def assert_decoding_matches_full_forward(mixer: nn.Module, d_model: int) -> None:
    """One token at a time, and a prefix prefill then the rest, equal the full forward (float64)."""
    x = torch.randn(2, 11, d_model, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(x)
        cache: dict = {}
        stepwise = torch.cat([mixer(x[:, t : t + 1], cache=cache) for t in range(x.shape[1])], dim=1)
        cache = {}
        prefill_then_decode = torch.cat(
            [mixer(x[:, :6], cache=cache), mixer(x[:, 6:9], cache=cache)]
            + [mixer(x[:, t : t + 1], cache=cache) for t in range(9, 11)],
            dim=1,
        )
    assert full.abs().max() > 0.1
    assert_close64(stepwise, full)
    assert_close64(prefill_then_decode, full)


def assert_packed_documents_match_each_alone(mixer: nn.Module, d_model: int) -> None:
    """Rows of 10 tokens hold documents of 3, 7 | 4, 1, 5 tokens: with cu_seqlens (row starts
    included) every document's output equals running it alone."""
    x = torch.randn(2, 10, d_model, dtype=torch.float64)
    cu_seqlens = torch.tensor([0, 3, 10, 14, 15, 20])
    with torch.no_grad():
        packed = mixer(x, cu_seqlens=cu_seqlens).reshape(20, d_model)
        tokens = x.reshape(20, d_model)
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            assert_close64(packed[start:end], mixer(tokens[None, start:end])[0])
