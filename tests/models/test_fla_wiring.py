"""ebb's calls into fla's and liger-kernel's Triton kernels, checked on CPU by Triton's interpreter
(skipped unless TRITON_INTERPRET=1 and fla imports): the fused norms, L2 norm, short convolution
and linear cross-entropies against ebb's PyTorch forms, forward and backward, and a whole model
with every fused layer against the same model without. Run alone, with the kernels installed
beside the project, e.g.

    pip install --target /tmp/fla-cpu --no-deps triton flash-linear-attention fla-core liger-kernel einops
    PYTHONPATH=/tmp/fla-cpu TRITON_INTERPRET=1 python -m pytest tests/models/test_fla_wiring.py"""
from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import needs_interpreter  # first: it sets Triton's autotuner up before fla loads

pytestmark = needs_interpreter

import models.layers.fla_modules as fla_modules  # noqa: E402
import models.layers.norms as norms  # noqa: E402
import models.mlp as mlp  # noqa: E402
from models.layers.conv import ShortConv  # noqa: E402
from models.model import HybridLM  # noqa: E402
from pretrain import linear_ce  # noqa: E402
from tests.conftest import tiny_model_config  # noqa: E402


@pytest.fixture
def fused(monkeypatch):
    """Switches the layers' fla kernels on or off, on CPU tensors."""
    def switch(on: bool) -> None:
        monkeypatch.setattr(fla_modules, "fla_layers_for", lambda x: on)
    return switch


def outputs_and_grads(fn, *inputs: torch.Tensor, params=()) -> list[torch.Tensor]:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad((out * torch.cos(out)).sum(), [*leaves, *params])
    return [out.detach(), *grads]


def assert_same(fn, fused, *inputs: torch.Tensor, params=(), atol: float = 1e-5) -> None:
    fused(True)
    got = outputs_and_grads(fn, *inputs, params=params)
    fused(False)
    want = outputs_and_grads(fn, *inputs, params=params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("norm", ["rms", "gated", "gate_first"])
def test_fused_norms_match_pytorch(fused, norm):
    torch.manual_seed(0)
    module = {"rms": norms.RMSNorm(32), "gated": norms.GatedRMSNorm(32), "gate_first": norms.GatedRMSNorm(128, 32, gate_first=True)}[norm]
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
    x, z = torch.randn(2, 10, 4, 32), torch.randn(2, 10, 4, 32)
    if norm == "gate_first":
        x, z = x.flatten(-2), z.flatten(-2)
    inputs = (x,) if norm == "rms" else (x, z)
    assert_same(module, fused, *inputs, params=[module.weight])


def test_fused_swiglu_matches_pytorch(fused):
    module = mlp.SwiGLU(tiny_model_config("*", d_model=32, mlp_hidden=48), 0)
    assert_same(module, fused, torch.randn(2, 10, 32), params=list(module.parameters()))


def test_fused_l2_norm_matches_pytorch(fused):
    assert_same(norms.l2_norm, fused, torch.randn(2, 10, 3, 32))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("documents", [False, True])
def test_fused_short_conv_matches_pytorch(fused, bias, documents):
    torch.manual_seed(0)
    conv = ShortConv(16, 4, bias=bias)
    cu_seqlens = torch.tensor([0, 2, 12, 30], dtype=torch.int32) if documents else None
    assert_same(lambda x: conv(x, cu_seqlens)[0], fused, torch.randn(1, 30, 16), params=list(conv.parameters()))


def test_a_model_with_every_fused_layer_matches_pytorch(fused):
    torch.manual_seed(0)
    model = HybridLM(tiny_model_config("GMTS", d_model=64))
    ids, cu_seqlens = torch.randint(0, 64, (1, 40)), torch.tensor([0, 13, 40], dtype=torch.int32)
    params = list(model.parameters())
    assert_same(lambda: model(ids, cu_seqlens=cu_seqlens), fused, params=params, atol=1e-4)


@pytest.mark.parametrize("kernel", list(linear_ce.FUSED_KERNELS))
def test_fused_linear_cross_entropy_matches_chunked(kernel):
    if linear_ce.fused_kernel(kernel) is None:
        pytest.skip(f"{kernel} is not installed")
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 16, 32), torch.randn(100, 32)
    labels = torch.randint(0, 100, (2, 16))
    labels[0, :3] = linear_ce.IGNORE_INDEX
    results = []
    for loss in (lambda h, w: linear_ce.fused_linear_cross_entropy(h, w, labels, kernel), lambda h, w: linear_ce.chunked_linear_cross_entropy(h, w, labels)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        value = loss(h, w)
        results.append([value.detach(), *torch.autograd.grad(value, (h, w))])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
