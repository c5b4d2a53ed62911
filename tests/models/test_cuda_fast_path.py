"""The GPU fast path on a CUDA device (skipped without one): fla's op kernels and fused norms
against the PyTorch forms at bfloat16, every mixer training under the dispatch rule, and compiled
blocks against eager. Tolerances are relative norms of whole tensors (bf16 kernels against float32
references)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models.ops as ops
from models.layers.conv import ShortConv
from models.layers.fla_modules import fla_kernel_for
from models.layers.norms import GatedRMSNorm, RMSNorm, l2_norm
from models.model import HybridLM
from models.ops import dispatch
from pretrain.config import build_config
from pretrain.data.packing import Batch
from pretrain.parallelize import Parallel, fast_path_header, parallelize
from pretrain.runtime import Runtime
from pretrain.step import train_step
from tests.conftest import every_mixer, tiny_model_config, tiny_model_overrides

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")
SHAPE = {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12)).item()


def outputs_and_grads(fn, inputs: dict, grad_out: torch.Tensor | None = None) -> list[torch.Tensor]:
    leaves = {n: t.detach().clone().requires_grad_(t.is_floating_point()) for n, t in inputs.items()}
    out = fn(**leaves)
    out = out[0] if isinstance(out, tuple) else out
    grad_out = grad_out if grad_out is not None else torch.ones_like(out)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [leaves[n].grad for n in inputs if leaves[n].grad is not None]


def with_and_without_fused_layers(monkeypatch, fn, inputs: dict, module: torch.nn.Module) -> tuple[list, list]:
    """`fn`'s output and the gradients of `inputs` and of `module`'s parameters, with fla's fused
    layers, then with EBB_FUSED_LAYERS=0."""
    def run() -> list[torch.Tensor]:
        module.zero_grad(set_to_none=True)
        return outputs_and_grads(fn, inputs) + [p.grad.clone() for p in module.parameters()]

    fused = run()
    monkeypatch.setenv("EBB_FUSED_LAYERS", "0")
    return fused, run()


def op_inputs(op: str, dtype: torch.dtype, H: int = 2, K: int = 128, V: int = 128, T: int = 300) -> dict:
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(CUDA)  # noqa: E731
    args = {"q": F.normalize(rand(1, T, H, K), dim=-1).to(dtype), "k": F.normalize(rand(1, T, H, K), dim=-1).to(dtype), "v": rand(1, T, H, V).to(dtype)}
    if op in ("chunk_simple_gla", "chunk_gated_delta_rule"):
        args["g"] = F.logsigmoid(rand(1, T, H) + 3)
    if op in ("chunk_delta_rule", "chunk_gated_delta_rule"):
        args["beta"] = torch.sigmoid(rand(1, T, H)).to(dtype)
    args["cu_seqlens"] = torch.tensor([0, 100, 101, 300], device=CUDA)
    return args


def test_ops_receive_the_autocast_dtype():
    model = HybridLM(tiny_model_config(every_mixer())).to(CUDA)
    with dispatch.recording(model) as calls, torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(torch.zeros(1, 32, dtype=torch.long, device=CUDA))
    assert calls and {call.dtype for call in calls} == {torch.bfloat16}
    for call in calls:  # the activations bf16; log-decays and beta float32, as fla's own layers give them
        assert all((dtype == torch.bfloat16) == (name in ops.ACTIVATIONS) for name, dtype in call.dtypes), call


def test_the_start_up_probe_runs_no_fused_layer():
    """The probe's toy shapes must not autotune the layers' kernels: Triton would keep those configurations."""
    x = torch.ones(2, 8, device=CUDA)
    assert fla_kernel_for(x, "fla.modules.l2norm", "l2norm") is not None
    with dispatch.recording(HybridLM(tiny_model_config("G"))):
        assert fla_kernel_for(x, "fla.modules.l2norm", "l2norm") is None


@pytest.mark.parametrize("key_dim", [64, 128])
@pytest.mark.parametrize("op", ["chunk_simple_gla", "chunk_delta_rule", "chunk_gated_delta_rule"])
def test_fla_op_at_bf16_matches_the_torch_form_in_float32(op, key_dim):
    """fla's kernel for every key dim, under the #640 rule too (key dim 64 then padded to 128),
    once the start-up check passed."""
    pytest.importorskip("fla")
    fn = getattr(ops, op)
    low = op_inputs(op, torch.bfloat16, K=key_dim)
    decided = ops.checked_decision(dispatch.OpCall.of("?", op, low), CUDA)
    assert decided.backend == "fla", decided.reason
    reference = {n: (t.float() if t.is_floating_point() else t) for n, t in low.items()}
    grad_out = torch.randn(low["v"].shape, generator=torch.Generator().manual_seed(1)).to(CUDA)
    got = outputs_and_grads(fn, low, grad_out)
    want = outputs_and_grads(fn.torch_op, reference, grad_out)
    assert len(got) == len(want)
    for name, a, b in zip(["o", *[n for n in low if low[n].is_floating_point()]], got, want):
        assert rel_err(a, b) < 2e-2, f"{op} {name}: rel err {rel_err(a, b):.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norm", ["rms", "gated", "gate_first", "l2"])
def test_fused_norms_match_pytorch(monkeypatch, norm, dtype):
    pytest.importorskip("fla")
    torch.manual_seed(0)
    x, z = torch.randn(2, 64, 4, 128, device=CUDA, dtype=dtype), torch.randn(2, 64, 4, 128, device=CUDA, dtype=dtype)
    module = {"rms": RMSNorm(128), "gated": GatedRMSNorm(128), "gate_first": GatedRMSNorm(512, 128, gate_first=True), "l2": RMSNorm(128)}[norm].to(CUDA)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
    if norm == "gate_first":
        x, z = x.flatten(-2), z.flatten(-2)
    assert fla_kernel_for(x, "fla.modules.layernorm", "rms_norm") is not None
    call = {"rms": lambda x, z: module(x), "l2": lambda x, z: l2_norm(x) * z}.get(norm, module)
    got = outputs_and_grads(call, {"x": x, "z": z})
    monkeypatch.setenv("EBB_FUSED_LAYERS", "0")
    assert fla_kernel_for(x, "fla.modules.layernorm", "rms_norm") is None
    want = outputs_and_grads(call, {"x": x, "z": z})
    for a, b in zip(got, want):
        assert rel_err(a, b) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("window", [None, 64])
def test_flex_attention_over_packed_documents_matches_the_dense_mask_with_gradients(window):
    from models.mixers.attention import Attention

    torch.manual_seed(0)
    cfg = tiny_model_config("*", {"attention": {"num_heads": 4, "num_kv_heads": 2, "window_size": window}}, d_model=128)
    x = torch.randn(2, 300, 128, device=CUDA)
    cu_seqlens = torch.tensor([0, 7, 200, 300, 301, 550, 600], dtype=torch.int32, device=CUDA)
    results = []
    for kernel in ("sdpa", "flex"):
        torch.manual_seed(0)
        cfg.mixers.attention.packed_kernel = kernel
        mixer = Attention(cfg, 0).to(CUDA)
        results.append(outputs_and_grads(lambda x: mixer(x, cu_seqlens=cu_seqlens), {"x": x}) + [p.grad for p in mixer.parameters()])
    for got, want in zip(results[1], results[0]):
        assert rel_err(got, want) < 1e-3


@pytest.mark.parametrize("bias", [False, True])
def test_fused_short_conv_matches_pytorch_over_packed_documents(monkeypatch, bias):
    pytest.importorskip("fla")
    torch.manual_seed(0)
    conv = ShortConv(256, 4, bias=bias).to(CUDA)
    x = torch.randn(1, 300, 256, device=CUDA)
    cu_seqlens = torch.tensor([0, 2, 100, 300], dtype=torch.int32, device=CUDA)
    assert fla_kernel_for(x, "fla.modules.convolution", "causal_conv1d") is not None
    got, want = with_and_without_fused_layers(monkeypatch, lambda x: conv(x, cu_seqlens)[0], {"x": x}, conv)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-4


def test_fused_swiglu_matches_pytorch(monkeypatch):
    pytest.importorskip("fla")
    from models.mlp import SwiGLU

    torch.manual_seed(0)
    module = SwiGLU(tiny_model_config("*", d_model=128, mlp_hidden=384), 0).to(CUDA)
    got, want = with_and_without_fused_layers(monkeypatch, module, {"x": torch.randn(2, 64, 128, device=CUDA)}, module)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-4


def train_losses(overrides: list[str], steps: int = 3) -> tuple[list[float], str]:
    cfg = build_config({}, [*overrides, "train.device=cuda", "train.dtype=bfloat16"])
    torch.manual_seed(0)
    model = HybridLM(cfg.model).to(CUDA)
    header = ops.plan_model(model, CUDA, torch.bfloat16)
    par, runtime = Parallel(dict(SHAPE)), Runtime(CUDA, torch.bfloat16)
    parallelize(par, model, cfg, runtime)
    header += "\n" + fast_path_header(par, cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 129), generator=gen).to(CUDA)
    batch = Batch(ids[:, :-1], ids[:, 1:], torch.tensor([0, 100, 128, 256], dtype=torch.int32, device=CUDA))
    return [train_step(par, optimizer, iter([batch]), 1, 1.0, runtime).loss.item() for _ in range(steps)], header


@pytest.mark.parametrize("pattern,mixers", [(every_mixer(), None), ("GM", {"gated_deltanet": {"head_dim": 128}, "mamba2": {"d_state": 128}})])
def test_every_mixer_trains_on_cuda_like_the_pytorch_ops(monkeypatch, pattern, mixers):
    fast, header = train_losses(tiny_model_overrides(pattern, mixers))
    print(header)
    assert header.startswith("ebb: ops: ")
    if dispatch.platform_of(CUDA).fla:  # the tuned kernel configs for this GPU: applied, or why not
        assert any(line.startswith(("ebb: fla kernel configs: ", "ebb: warning: fla kernel configs ")) for line in header.splitlines())
    monkeypatch.setenv("EBB_OPS_BACKEND", "torch")
    monkeypatch.setenv("EBB_FUSED_LAYERS", "0")
    slow, _ = train_losses(tiny_model_overrides(pattern, mixers))
    assert all(torch.isfinite(torch.tensor(fast)))
    assert fast == pytest.approx(slow, rel=2e-2)


@pytest.mark.timeout(600)
def test_compiled_blocks_match_eager_on_cuda():
    overrides = tiny_model_overrides("GM*", {"gated_deltanet": {"head_dim": 128}})
    eager, _ = train_losses([*overrides, "train.compile=false"])
    compiled, header = train_losses([*overrides, "train.compile=true"])
    assert "torch.compile: each block" in header
    assert compiled == pytest.approx(eager, rel=2e-2)
