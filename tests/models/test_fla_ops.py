"""ebb's recurrent ops through fla's Triton kernels, on CPU by Triton's interpreter (skipped unless
TRITON_INTERPRET=1 and fla imports; tests/models/test_fla_wiring.py has the commands):
- what `dispatch.run_fla` runs (fla's kernel, states in ebb's [K, V] layout, key dims padded or not) against ebb's
  float64 PyTorch op: outputs, final states and every input's gradient, over packed documents
  with initial states;
- a training step of the throughput bench's ebb G stack asks Triton to autotune the chunked
  recurrence's kernels at exactly the keys a step of fla's GatedDeltaNetForCausalLM asks for, so
  that on a GPU the bench's models pay fla's minutes of autotuning once."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.triton_interpreter import needs_interpreter  # first: it sets Triton's autotuner up before fla loads

pytestmark = needs_interpreter

import models.layers.fla_modules as fla_modules  # noqa: E402
import models.ops as ops  # noqa: E402
from models.model import HybridLM  # noqa: E402
from models.ops import dispatch  # noqa: E402
from pretrain.linear_ce import chunked_linear_cross_entropy  # noqa: E402
from tests.runs import load_bench  # noqa: E402

H, K, V, T = 2, 32, 64, 100
DOCUMENTS = torch.tensor([0, 37, T], dtype=torch.int32)  # the boundary inside a chunk


def op_inputs(op: str, qk_heads: int = H) -> dict[str, torch.Tensor]:
    """float64 leaves for `op`: unit keys, negative log decays, beta in (0, 1), one state per
    document; `qk_heads` < H: grouped value heads."""
    gen = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    inputs = {"q": randn(1, T, qk_heads, K), "k": F.normalize(randn(1, T, qk_heads, K), dim=-1), "v": randn(1, T, H, V),
              "g": -F.softplus(randn(1, T, H))}
    if op == "chunk_gated_delta_rule":
        inputs["beta"] = torch.rand(1, T, H, generator=gen, dtype=torch.float64)
    inputs["initial_state"] = randn(len(DOCUMENTS) - 1, H, K, V)
    return {n: x.requires_grad_() for n, x in inputs.items()}


def outputs_and_grads(fn, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    out, final = fn(**inputs, output_final_state=True, cu_seqlens=DOCUMENTS)
    gen = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=gen).to(out)).sum() + (final * torch.randn(final.shape, generator=gen).to(final)).sum()
    return [out, final, *torch.autograd.grad(loss, list(inputs.values()))]


@pytest.mark.parametrize(
    "op, qk_heads, pad_key_to",
    [("chunk_gated_delta_rule", H, None), ("chunk_gated_delta_rule", 1, None), ("chunk_simple_gla", H, None),
     ("chunk_gated_delta_rule", 1, 128), ("chunk_simple_gla", H, 128)],
    ids=["gated_delta_rule", "gated_delta_rule-gva", "simple_gla", "gated_delta_rule-gva-padded", "simple_gla-padded"],
)
def test_fla_kernel_matches_the_float64_op(op, qk_heads, pad_key_to):
    """float32 through fla's kernel (run with its state V-first; grouped value heads as they come;
    key dim zero-padded to 128 as under fla #640) against ebb's op in float64."""
    inputs = op_inputs(op, qk_heads)
    want = outputs_and_grads(getattr(ops, op).torch_op, inputs)
    fla_op = lambda **arguments: dispatch.run_fla(op, arguments, pad_key_to)  # noqa: E731
    got = outputs_and_grads(fla_op, {n: x.detach().float().requires_grad_() for n, x in inputs.items()})
    for name, a, b in zip(["output", "final state", *(f"d{n}" for n in inputs)], got, want, strict=True):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_fla_rwkv7_with_the_mixers_decay_bound_matches_the_float64_op():
    """fla's chunk_rwkv7 told w >= -e^-0.5 (as ebb's RWKV-7 mixer tells it: chunks of 64 on tensor
    cores) against ebb's op in float64, over packed documents with initial states."""
    gen = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    kappa = F.normalize(randn(1, T, H, K), dim=-1)
    learning_rate = torch.rand(1, T, H, K, generator=gen, dtype=torch.float64)
    inputs = {"r": randn(1, T, H, K), "w": -math.exp(-0.5) * torch.rand(1, T, H, K, generator=gen, dtype=torch.float64),
              "k": randn(1, T, H, K) * 0.5, "v": randn(1, T, H, V), "a": -kappa, "b": kappa * learning_rate,
              "initial_state": randn(len(DOCUMENTS) - 1, H, K, V)}
    inputs = {n: x.requires_grad_() for n, x in inputs.items()}
    want = outputs_and_grads(ops.chunk_rwkv7.torch_op, inputs)
    fla_op = lambda **arguments: dispatch.run_fla("chunk_rwkv7", {**arguments, "lower_bound": -math.exp(-0.5)})  # noqa: E731
    got = outputs_and_grads(fla_op, {n: x.detach().float().requires_grad_() for n, x in inputs.items()})
    for name, a, b in zip(["output", "final state", *(f"d{n}" for n in inputs)], got, want, strict=True):
        error = (a.double() - b.detach()).abs().max() / b.abs().max()
        assert error < 5e-4, f"{name}: largest error {error:.1e} of the largest value"  # fla's float32 DPLR: up to 1e-4


def _kernel_name(tuner) -> str:
    return f"{tuner.base_fn.__module__}.{tuner.base_fn.__name__}"


@pytest.fixture
def autotune_requests(monkeypatch):
    """Every (kernel, autotune key) launched, Triton's key being the key arguments' values and every
    tensor argument's dtype; the kernels do not run (only the keys are compared)."""
    import triton.runtime.autotuner as autotuner

    requests: set[tuple[str, tuple[str, ...]]] = set()

    def record(self, *args, **kwargs):
        named = {n: a for n, a in {**dict(zip(self.arg_names, args)), **kwargs}.items() if n in self.arg_names}
        key = [str(named[k]) for k in self.keys if k in named] + [str(a.dtype) for a in named.values() if hasattr(a, "dtype")]
        requests.add((_kernel_name(self), tuple(key)))

    monkeypatch.setattr(autotuner.Autotuner, "run", record)
    return requests


def ebb_step(bench, shape: dict, ids: torch.Tensor, documents: torch.Tensor) -> None:
    model = HybridLM(bench.ebb_config("ebb_G", shape, tiny=True).model)
    rows = ids.view(2, -1)
    model(rows, cu_seqlens=documents, head=lambda h, w: chunked_linear_cross_entropy(h, w, rows)).backward()


def fla_step(bench, shape: dict, ids: torch.Tensor, documents: torch.Tensor) -> None:
    from fla.models import GatedDeltaNetForCausalLM

    config = bench.fla_config(shape)
    config.fuse_cross_entropy = False  # fla's fused loss asserts CUDA; the losses are not compared here
    GatedDeltaNetForCausalLM(config)(input_ids=ids, labels=ids, cu_seqlens=documents).loss.backward()


# fla's model computes its decay inside the first kernel (gdn_gate_chunk_cumsum) and recomputes
# SwiGLU's product in its fused linear; ebb passes log alpha and keeps the product: one-pass
# elementwise kernels, each tuned in seconds, not the minutes of the chunked recurrence's.
ONE_PASS_KERNELS = {"fla.ops.utils.cumsum.chunk_local_cumsum_scalar_kernel", "fla.modules.activations.ops.swiglu_fwdbwd_kernel"}
RECURRENCE_KERNELS = {"chunk_gated_delta_rule_fwd_kernel_h_blockdim64", "chunk_fwd_kernel_o", "chunk_bwd_kernel_dqkwg",
                      "chunk_gated_delta_rule_bwd_kernel_dhu_blockdim64", "recompute_w_u_fwd_kernel", "prepare_wy_repr_bwd_kernel"}


def test_ebb_G_step_autotunes_what_flas_model_step_does(autotune_requests, monkeypatch):
    monkeypatch.setattr(dispatch, "fla_padding", lambda op, x: (True, None))  # as on CUDA
    monkeypatch.setattr(fla_modules, "fla_layers_for", lambda x: True)
    bench = load_bench("gpu_throughput")
    shape = dict(bench.TINY, layers=2)
    ids = torch.randint(0, shape["vocab"], (1, 2 * shape["seq_len"]), generator=torch.Generator().manual_seed(0))
    documents = torch.tensor([0, shape["seq_len"], 2 * shape["seq_len"]], dtype=torch.int32)

    ebb_step(bench, shape, ids, documents)
    ebb = set(autotune_requests)
    autotune_requests.clear()
    fla_step(bench, shape, ids, documents)
    fla = set(autotune_requests)

    assert RECURRENCE_KERNELS <= {name.rsplit(".", 1)[1] for name, _ in ebb & fla}
    assert {name for name, _ in ebb - fla} <= ONE_PASS_KERNELS, sorted(ebb - fla)
