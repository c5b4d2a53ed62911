"""RWKV-7: the chunked DPLR op against its step recurrence and against the delta rule; the
time-mix mixer (decoding, packed documents, value residual), the channel-mix, and whole models."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import models.ops as ops

torch.set_num_threads(1)

H, K, V = 2, 8, 16
ATOL = 1e-10


# --- the op -----------------------------------------------------------------------------------


def leaves(**tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: x.detach().requires_grad_() for name, x in tensors.items()}


def rwkv7_inputs(batch: int, length: int, n_states: int | None, seed: int = 0) -> dict[str, torch.Tensor]:
    """float64 inputs shaped like RWKV-7's: log decay w in (-e^-0.5, 0), a = -kappa and
    b = kappa * lr for a unit key kappa and a learning rate lr in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    kappa = F.normalize(randn(batch, length, H, K), dim=-1)
    lr = torch.rand(batch, length, H, K, generator=gen, dtype=torch.float64)
    inputs = {
        "r": randn(batch, length, H, K),
        "w": -0.6065 * torch.sigmoid(randn(batch, length, H, K)),
        "k": randn(batch, length, H, K),
        "v": randn(batch, length, H, V),
        "a": -kappa,
        "b": kappa * lr,
    }
    if n_states is not None:
        inputs["initial_state"] = randn(n_states, H, K, V)
    return leaves(**inputs)


def run(fn: Callable, inputs: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return fn(**inputs, output_final_state=True, **kwargs)


def outputs_and_gradients(fn: Callable, inputs: dict, **kwargs) -> dict[str, torch.Tensor]:
    """o, the final state, and the gradient of every input under fixed random upstream gradients."""
    o, final = run(fn, inputs, **kwargs)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    dfinal = torch.randn(final.shape, generator=gen, dtype=final.dtype)
    grads = torch.autograd.grad((o * do).sum() + (final * dfinal).sum(), list(inputs.values()))
    return {"o": o, "final_state": final, **{f"d{name}": g for name, g in zip(inputs, grads)}}


def assert_same(got: dict, expected: dict, atol: float = ATOL) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "batch, length, chunk_size, with_initial_state",
    [(2, 64, 16, True), (2, 50, 16, True), (1, 5, 16, False), (1, 30, 12, True), (2, 40, 64, False)],
    ids=["multiple-of-chunk", "padded", "shorter-than-chunk", "chunk-not-power-of-2", "no-initial-state"],
)
def test_chunked_equals_recurrence(batch, length, chunk_size, with_initial_state):
    inputs = rwkv7_inputs(batch, length, batch if with_initial_state else None)
    got = outputs_and_gradients(ops.chunk_rwkv7, inputs, chunk_size=chunk_size)
    expected = outputs_and_gradients(ops.recurrent_rwkv7, inputs)
    assert expected["o"].abs().max() > 1 and expected["dw"].abs().max() > 1e-2
    assert_same(got, expected)


@pytest.mark.parametrize("with_initial_states", [True, False], ids=["initial-states", "no-initial-states"])
def test_packed_documents_equal_documents_one_by_one(with_initial_states):
    """Documents of 17, 1, 0, 14, 40 and 5 tokens, chunk 16: starts inside chunks and on a chunk
    boundary, a 1-token and an empty document; without initial states they share chunks."""
    lengths = [17, 1, 0, 14, 40, 5]
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    inputs = rwkv7_inputs(1, sum(lengths), len(lengths) if with_initial_states else None)
    got = outputs_and_gradients(ops.chunk_rwkv7, inputs, cu_seqlens=torch.tensor(bounds), chunk_size=16)

    def one_by_one(
        output_final_state: bool, initial_state: torch.Tensor | None = None, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, finals = [], []
        for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            document = {name: x[:, start:end] for name, x in inputs.items()}
            if initial_state is not None:
                document["initial_state"] = initial_state[n : n + 1]
            o, final = run(ops.recurrent_rwkv7, document)
            outputs.append(o)
            finals.append(final)
        return torch.cat(outputs, dim=1), torch.cat(finals)

    assert_same(got, outputs_and_gradients(one_by_one, inputs))


def test_no_decay_and_a_minus_beta_k_b_k_is_the_delta_rule():
    """With unit keys k, w = 0 (no decay), a = -beta k, b = k and the write key beta k, the DPLR
    update S + b (a^T S) + k' v^T = S - beta k k^T S + beta k v^T = S + k (beta (v - S^T k))^T is
    the delta rule's; the read-out is the same with r = q."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 37, H, K, generator=gen, dtype=torch.float64)
    k = F.normalize(torch.randn(2, 37, H, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(2, 37, H, V, generator=gen, dtype=torch.float64)
    beta = torch.rand(2, 37, H, generator=gen, dtype=torch.float64)
    state = torch.randn(2, H, K, V, generator=gen, dtype=torch.float64)
    b = beta[..., None]
    o, final = ops.chunk_rwkv7(
        q, torch.zeros_like(k), b * k, v, -b * k, k, scale=0.5, initial_state=state, output_final_state=True, chunk_size=16
    )
    o_ref, final_ref = ops.chunk_delta_rule(q, k, v, beta, scale=0.5, initial_state=state, output_final_state=True, chunk_size=16)
    assert_same({"o": o, "final_state": final}, {"o": o_ref, "final_state": final_ref})


def test_default_scale_is_one_and_dtypes_follow_the_other_ops():
    inputs = {name: x.detach() for name, x in rwkv7_inputs(1, 20, None).items()}
    o_one, _ = ops.chunk_rwkv7(**inputs, scale=1.0)
    assert torch.equal(ops.chunk_rwkv7(**inputs)[0], o_one)
    low = {name: x.to(torch.bfloat16) for name, x in inputs.items()}
    o, final = ops.chunk_rwkv7(**low, output_final_state=True, chunk_size=8)
    assert (o.dtype, final.dtype) == (torch.bfloat16, torch.float32)
    torch.testing.assert_close(o.double(), ops.recurrent_rwkv7(**inputs)[0], atol=0.1, rtol=0.05)
    assert ops.chunk_rwkv7(**low)[1] is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fla_kernel_matches_torch_chunks(monkeypatch):
    pytest.importorskip("fla")
    lengths = [100, 1, 200, 27]
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    inputs = leaves(**{name: x.float().cuda() for name, x in rwkv7_inputs(1, sum(lengths), len(lengths)).items()})
    monkeypatch.setenv("EBB_OPS_BACKEND", "auto")
    got = outputs_and_gradients(ops.chunk_rwkv7, inputs, cu_seqlens=bounds)
    monkeypatch.setenv("EBB_OPS_BACKEND", "torch")
    expected = outputs_and_gradients(ops.chunk_rwkv7, inputs, cu_seqlens=bounds)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-3, rtol=2e-3, msg=lambda m: f"{name}: {m}")
