"""The chunked linear cross-entropy against today's full loss, and how `train.loss` resolves."""
from __future__ import annotations

import pytest
import torch

from models.model import HybridLM
from pretrain import linear_ce
from pretrain.config import ConfigError, build_config
from pretrain.linear_ce import chunked_linear_cross_entropy, fused_linear_cross_entropy, head_loss, resolve_loss
from pretrain.loss import IGNORE_INDEX, lm_loss
from tests.conftest import tiny_model_config


@pytest.mark.parametrize("chunk", [1, 5, 64, None])
def test_chunked_matches_full_loss_and_gradients_in_float64(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = IGNORE_INDEX
    labels[2, -1] = IGNORE_INDEX
    full = lm_loss(hidden @ weight.t(), labels, reduction="sum")
    grads_full = torch.autograd.grad(full * 0.37, (hidden, weight))
    chunked = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    grads = torch.autograd.grad(chunked * 0.37, (hidden, weight))
    torch.testing.assert_close(chunked, full.double(), rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_full):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    mean = chunked_linear_cross_entropy(hidden, weight, labels, reduction="mean", chunk_tokens=chunk)
    torch.testing.assert_close(mean, lm_loss(hidden @ weight.t(), labels).double(), rtol=1e-12, atol=1e-12)


def test_only_the_wanted_gradients_and_none_without_grad():
    hidden, weight = torch.randn(9, 8, requires_grad=True), torch.randn(20, 8)
    labels = torch.randint(0, 20, (9,))
    chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=4).backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=4)
    torch.testing.assert_close(loss, lm_loss((hidden @ weight.t())[None], labels[None], reduction="sum"))


@pytest.mark.parametrize("tied", [True, False])
def test_model_head_path_matches_logits_path_with_tied_embeddings(tied):
    """The model hands its normed hidden states and head weight to the chunked loss: same loss and
    same gradient on every parameter (the tied embedding gets both of its gradients)."""
    torch.manual_seed(0)
    model = HybridLM(tiny_model_config("TG*", tie_embeddings=tied)).double()
    ids = torch.randint(0, 64, (2, 12))
    labels = torch.randint(0, 64, (2, 12))
    labels[1, :4] = IGNORE_INDEX
    full = lm_loss(model(ids), labels, reduction="sum")
    grads_full = torch.autograd.grad(full, list(model.parameters()))
    head = head_loss("chunked")
    chunked = model(ids, head=lambda h, w: chunked_linear_cross_entropy(h, w, labels, chunk_tokens=5))
    grads = torch.autograd.grad(chunked, list(model.parameters()))
    torch.testing.assert_close(chunked, full.double(), rtol=1e-10, atol=1e-10)
    for (name, _), got, want in zip(model.named_parameters(), grads, grads_full):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10, msg=name)
    assert head is not None and head_loss("full") is None


def test_bf16_autocast_runs_the_matmul_in_bf16_like_the_head():
    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 32), torch.randn(40, 32)
    labels = torch.randint(0, 40, (10,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = lm_loss(torch.nn.functional.linear(hidden, weight)[None], labels[None], reduction="sum")
        chunked = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=3)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)


def test_resolve_loss():
    assert resolve_loss("auto", "cpu") == ("chunked", None)
    assert resolve_loss("full", "cpu") == ("full", None)
    assert resolve_loss("chunked", "cpu", {"tp": 1, "pp": 1}) == ("chunked", None)
    assert resolve_loss("auto", "cuda", {"tp": 2, "pp": 1}) == ("chunked", None)  # vocabulary-parallel
    assert resolve_loss("chunked", "cpu", {"tp": 2, "pp": 1}) == ("chunked", None)
    name, warning = resolve_loss("fused", "cuda", {"tp": 2, "pp": 1})
    assert name == "chunked" and warning.startswith("ebb: warning: train.loss=fused falls back to chunked with parallel.tp > 1")
    assert resolve_loss("auto", "cpu", {"tp": 2, "pp": 2}) == ("chunked", None)  # the last stage applies it
    assert resolve_loss("chunked", "cpu", {"tp": 1, "pp": 2}) == ("chunked", None)
    name, warning = resolve_loss("fused", "cpu")
    assert name == "chunked" and warning == "ebb: warning: train.loss=fused falls back to chunked (not on CUDA)"


@pytest.mark.parametrize("installed, auto, fused", [(("liger-kernel", "fla"), "fused", "fused"), (("fla",), "chunked", "fused"), ((), "chunked", "chunked")])
def test_auto_takes_a_fused_kernel_only_where_it_measured_faster(monkeypatch, installed, auto, fused):
    """On CUDA `auto` is liger-kernel's fused loss, else chunked (fla's measured slower than chunked);
    `fused` takes whichever is installed."""
    monkeypatch.setattr(linear_ce, "fused_kernel", lambda only=None: next(((n, None) for n in installed if only in (None, n)), None))
    assert resolve_loss("auto", "cuda")[0] == auto
    assert resolve_loss("fused", "cuda")[0] == fused


def test_fused_loss_on_meta_tensors_gives_the_summed_loss_shape():
    """A pipeline's metadata inference (torch < 2.13) runs the last stage on the meta device."""
    hidden, weight = torch.empty(2, 8, 16, device="meta", requires_grad=True), torch.empty(100, 16, device="meta", requires_grad=True)
    loss = fused_linear_cross_entropy(hidden, weight, torch.zeros(2, 8, dtype=torch.long, device="meta"))
    assert loss.is_meta and loss.shape == () and loss.dtype == torch.float32
    loss.backward()
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape


def test_unknown_loss_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"^config key train.loss: unknown loss 'xent' \(one of auto, full, chunked, fused\)$"):
        build_config({}, ["train.loss=xent"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_chunked_on_cuda():
    if resolve_loss("fused", "cuda")[0] != "fused":
        pytest.skip("neither liger-kernel nor fla is installed")
    torch.manual_seed(0)
    hidden = torch.randn(4, 256, 64, device="cuda", requires_grad=True)
    weight = torch.randn(1000, 64, device="cuda", requires_grad=True)
    labels = torch.randint(0, 1000, (4, 256), device="cuda")
    labels[0, :10] = IGNORE_INDEX
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = fused_linear_cross_entropy(hidden, weight, labels)
        chunked = chunked_linear_cross_entropy(hidden, weight, labels)
    gf = torch.autograd.grad(fused, (hidden, weight))
    gc = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(fused.float(), chunked, rtol=2e-3, atol=1e-2)
    for a, b in zip(gf, gc):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.slow
def test_the_compiled_chunk_is_one_graph_whatever_the_chunk_count():
    """Under train.compile the chunked loss compiles its chunk, not its loop (which would unroll
    chunk by chunk): the same loss and gradients as eager, over token counts that leave different
    last chunks, from at most a graph per chunk shape."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    for tokens in (40, 61, 23):
        hidden = torch.randn(tokens, 16, generator=gen, requires_grad=True)
        labels = torch.randint(0, 50, (tokens,), generator=gen)
        labels[::5] = IGNORE_INDEX
        results = []
        for chunk_fn in (linear_ce.chunk_loss_and_grads, linear_ce.compiled_chunk()):
            weight.grad = None
            loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=7, chunk_fn=chunk_fn)
            results.append([loss, *torch.autograd.grad(loss, (hidden, weight))])
        for compiled, eager in zip(*results):
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert 1 <= counters["stats"]["unique_graphs"] <= 3  # the first shape, then dynamic sizes
