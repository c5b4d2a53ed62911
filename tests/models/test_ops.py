"""Chunkwise-parallel ops against their step recurrences: outputs, final states and gradients of
every input in float64 to 1e-10, for padded lengths, initial states and packed documents."""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import models.ops as ops
from models.ops.chunking import chunk_layout

H, K, V = 2, 8, 16
ATOL = 1e-10


@dataclass(frozen=True)
class Op:
    chunked: Callable
    recurrent: Callable
    gates: tuple[str, ...]  # per-head inputs after q, k, v, in signature order


OPS = {
    "simple_gla": Op(ops.chunk_simple_gla, ops.recurrent_simple_gla, ("g",)),
    "delta_rule": Op(ops.chunk_delta_rule, ops.recurrent_delta_rule, ("beta",)),
    "gated_delta_rule": Op(ops.chunk_gated_delta_rule, ops.recurrent_gated_delta_rule, ("g", "beta")),
}
# (op, largest beta): beta in (0, 2) gives the delta rules negative transition eigenvalues
OP_CASES = [
    ("simple_gla", 1.0),
    ("delta_rule", 1.0),
    ("delta_rule", 2.0),
    ("gated_delta_rule", 1.0),
    ("gated_delta_rule", 2.0),
]


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_()


def make_inputs(op: Op, batch: int, length: int, beta_max: float, n_states: int | None, seed: int = 0) -> dict:
    """Realistic float64 leaves: l2-normalised k, negative log-gates g, beta in (0, beta_max)."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    per_head = {
        "g": F.logsigmoid(randn(batch, length, H) + 2),
        "beta": beta_max * torch.rand(batch, length, H, generator=gen, dtype=torch.float64),
    }
    inputs = {
        "q": randn(batch, length, H, K),
        "k": F.normalize(randn(batch, length, H, K), dim=-1),
        "v": randn(batch, length, H, V),
        **{name: per_head[name] for name in op.gates},
    }
    if n_states is not None:
        inputs["initial_state"] = randn(n_states, H, K, V)
    return {name: leaf(x) for name, x in inputs.items()}


def run(fn: Callable, inputs: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return fn(**inputs, output_final_state=True, **kwargs)


def upstream(o: torch.Tensor, final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(o.shape, generator=gen, dtype=o.dtype), torch.randn(final.shape, generator=gen, dtype=final.dtype)


def gradients(inputs: dict, o: torch.Tensor, final: torch.Tensor, do: torch.Tensor, dfinal: torch.Tensor) -> dict:
    loss = (o * do).sum() + (final * dfinal).sum()
    return dict(zip(inputs, torch.autograd.grad(loss, list(inputs.values()))))


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("op_name, beta_max", OP_CASES)
@pytest.mark.parametrize(
    "batch, length, chunk_size, with_initial_state",
    [(2, 64, 16, True), (2, 50, 16, True), (1, 5, 16, False), (1, 30, 12, True)],
    ids=["multiple-of-chunk", "padded", "shorter-than-chunk", "chunk-not-power-of-2"],
)
def test_chunked_equals_recurrence(op_name, beta_max, batch, length, chunk_size, with_initial_state):
    op = OPS[op_name]
    inputs = make_inputs(op, batch, length, beta_max, batch if with_initial_state else None)
    o, final = run(op.chunked, inputs, chunk_size=chunk_size)
    o_ref, final_ref = run(op.recurrent, inputs)
    assert_same({"o": o, "final_state": final}, {"o": o_ref, "final_state": final_ref})
    do, dfinal = upstream(o_ref, final_ref)
    assert_same(gradients(inputs, o, final, do, dfinal), gradients(inputs, o_ref, final_ref, do, dfinal))


@pytest.mark.parametrize("op_name, beta_max", OP_CASES)
@pytest.mark.parametrize("with_initial_states", [True, False], ids=["initial-states", "no-initial-states"])
def test_packed_documents_equal_documents_one_by_one(op_name, beta_max, with_initial_states):
    """Documents of 17, 1, 0, 14, 40 and 5 tokens (chunk 16): different chunk counts, a 1-token
    and an empty document, starts inside a chunk and on a chunk boundary (32). With initial states
    each document is scanned on its own; without, documents share chunks and reset the state."""
    op = OPS[op_name]
    lengths = [17, 1, 0, 14, 40, 5]
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    inputs = make_inputs(op, 1, sum(lengths), beta_max, len(lengths) if with_initial_states else None)
    o, final = run(op.chunked, inputs, cu_seqlens=bounds, chunk_size=16)

    outputs, finals = [], []
    for n, (start, end) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        document = {name: x[:, start:end] for name, x in inputs.items() if name != "initial_state"}
        if with_initial_states:
            document["initial_state"] = inputs["initial_state"][n : n + 1]
        o_doc, final_doc = run(op.recurrent, document)
        outputs.append(o_doc)
        finals.append(final_doc)
    o_ref, final_ref = torch.cat(outputs, dim=1), torch.cat(finals)

    assert_same({"o": o, "final_state": final}, {"o": o_ref, "final_state": final_ref})
    do, dfinal = upstream(o_ref, final_ref)
    assert_same(gradients(inputs, o, final, do, dfinal), gradients(inputs, o_ref, final_ref, do, dfinal))


@pytest.mark.parametrize("with_initial_states, expected_chunks", [(False, 4), (True, 51)])
def test_short_documents_share_chunks_unless_each_has_an_initial_state(with_initial_states, expected_chunks):
    """50 one-token documents and one of 10 tokens, chunk 16: packed into ceil(60 / 16) chunks."""
    bounds = torch.tensor([0, *range(1, 51), 60])
    layout = chunk_layout(1, 60, bounds, with_initial_states, 16, torch.device("cpu"))
    assert layout.token_of_slot.numel() == expected_chunks * 16


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize(
    "cu_seqlens, batch, n_states",
    [([1, 5, 10], 1, None), ([0, 5, 9], 1, None), ([0, 6, 4, 10], 1, None), ([0, 5, 10], 2, None),
     ([0.0, 5.0, 10.0], 1, None), ([0, 5, 10], 1, 3)],
    ids=["not-from-0", "not-to-T", "decreasing", "batch-2", "float", "initial-states-not-N"],
)
def test_bad_cu_seqlens_or_initial_state_raise(op_name, cu_seqlens, batch, n_states):
    op = OPS[op_name]
    inputs = make_inputs(op, batch, 10, 1.0, n_states)
    with pytest.raises(ValueError, match="cu_seqlens|initial_state"):
        op.chunked(**inputs, cu_seqlens=torch.tensor(cu_seqlens))


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_keeps_input_dtype_and_state_is_float32(op_name, dtype):
    op = OPS[op_name]
    inputs = {name: x.detach().to(dtype) for name, x in make_inputs(op, 1, 20, 1.0, None).items()}
    o, final = run(op.chunked, inputs, chunk_size=8)
    o_ref, final_ref = run(op.recurrent, make_inputs(op, 1, 20, 1.0, None))
    assert (o.dtype, final.dtype) == (dtype, torch.float32)
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(o.double(), o_ref.detach(), atol=tolerance, rtol=tolerance)
    assert op.chunked(**inputs)[1] is None


def _chunk_simple_gla(
    q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=64
):
    return "torch"


_chunk_simple_gla.__name__ = "chunk_simple_gla"


@pytest.mark.parametrize(
    "on_cuda, backend, has_fla, expected",
    [
        (True, "auto", True, "fla"),
        (True, "torch", True, "torch"),
        (False, "auto", True, "torch"),
        (True, "auto", False, "torch"),
    ],
)
def test_dispatch_calls_fla_by_keyword_only_on_cuda(monkeypatch, on_cuda, backend, has_fla, expected):
    """The wrapper asks `dispatch.decision` (here on a fake Hopper with a good Triton) and calls
    fla's kernel with ebb's keywords, chunk_size dropped."""
    from models.ops import dispatch

    calls = []
    fake_platform = dispatch.Platform(cuda=True, capability=(9, 0), triton="3.7.1", fla=has_fla)
    monkeypatch.setattr(dispatch, "platform_of", lambda device: fake_platform)
    monkeypatch.setattr(dispatch, "fla_kernel", lambda name: (lambda **kwargs: calls.append(kwargs) or "fla") if has_fla else None)
    monkeypatch.setattr(dispatch, "_decision", dispatch._decision.__wrapped__)  # uncached: the fakes differ per case
    monkeypatch.setenv("EBB_OPS_BACKEND", backend)
    op = ops._fla_on_cuda(_chunk_simple_gla)
    q = types.SimpleNamespace(is_cuda=on_cuda, device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(1, 8, 2, 128))

    assert op(q, "k", "v", "g", 0.5, chunk_size=32, cu_seqlens="cu") == expected
    if expected == "fla":
        assert calls == [{"q": q, "k": "k", "v": "v", "g": "g", "scale": 0.5, "cu_seqlens": "cu"}]


def test_unknown_backend_raises(monkeypatch):
    monkeypatch.setenv("EBB_OPS_BACKEND", "triton")
    inputs = make_inputs(OPS["simple_gla"], 1, 4, 1.0, None)
    with pytest.raises(ValueError, match="EBB_OPS_BACKEND"):
        ops.chunk_simple_gla(**inputs)
