"""The fla-or-PyTorch decision per op, on fake platforms, and the header line on CPU."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from models.model import HybridLM
from models.ops import chunk_delta_rule, chunk_gated_delta_rule, dispatch, plan_model
from tests.conftest import tiny_model_config

H100 = (9, 0)
A100 = (8, 0)


def platform(capability=H100, triton="3.6.0", fla=True, cuda=True):
    return dispatch.Platform(cuda, capability, triton, fla)


@pytest.mark.parametrize(
    "op, plat, dtype, key_dim, backend, expected, lift, pad",
    [
        # fla #640: Hopper, Triton in [3.4.0, 3.7.1), gated ops: guard lifted, key dims under tile 128 padded to it
        ("chunk_gated_delta_rule", platform(), torch.bfloat16, 64, "auto", "fla", True, 128),
        ("chunk_gated_delta_rule", platform(), torch.bfloat16, 32, "auto", "fla", True, 128),
        ("chunk_gated_delta_rule", platform(), torch.bfloat16, 96, "auto", "fla", True, None),
        ("chunk_gated_delta_rule", platform(), torch.bfloat16, 128, "auto", "fla", True, None),
        ("chunk_gated_delta_rule", platform(), torch.bfloat16, 256, "auto", "fla", True, None),
        ("chunk_simple_gla", platform(), torch.bfloat16, 64, "auto", "fla", True, 128),
        ("chunk_simple_gla", platform(), torch.bfloat16, 128, "auto", "fla", True, None),
        ("chunk_gated_delta_rule", platform(triton="3.4.0"), torch.bfloat16, 64, "auto", "fla", True, 128),
        ("chunk_gated_delta_rule", platform(triton="3.3.1"), torch.bfloat16, 64, "auto", "fla", False, None),
        ("chunk_gated_delta_rule", platform(triton="3.7.1"), torch.bfloat16, 64, "auto", "fla", False, None),
        ("chunk_gated_delta_rule", platform(capability=A100), torch.bfloat16, 64, "auto", "fla", False, None),
        ("chunk_delta_rule", platform(), torch.bfloat16, 64, "auto", "fla", False, None),  # not gated: no #640
        ("chunk_rwkv7", platform(), torch.bfloat16, 64, "auto", "fla", False, None),
        # dtypes fla refuses
        ("chunk_delta_rule", platform(triton="3.7.1"), torch.float32, 128, "auto", "torch", False, None),
        ("chunk_gated_delta_rule", platform(triton="3.7.1"), torch.float32, 128, "auto", "fla", False, None),
        ("chunk_gated_delta_rule", platform(triton="3.7.1"), torch.float64, 128, "auto", "torch", False, None),
        # no fla, no CUDA, forced
        ("chunk_gated_delta_rule", platform(fla=False), torch.bfloat16, 128, "auto", "torch", False, None),
        ("chunk_gated_delta_rule", platform(cuda=False, capability=None, triton=None), torch.bfloat16, 128, "auto", "torch", False, None),
        ("chunk_gated_delta_rule", platform(triton="3.7.1"), torch.bfloat16, 128, "torch", "torch", False, None),
        ("chunk_gated_delta_rule", platform(), torch.bfloat16, 64, "fla", "fla", True, 128),  # forced: the same workaround
        ("chunk_delta_rule", platform(), torch.float32, 64, "fla", "fla", False, None),
    ],
)
def test_decide(op, plat, dtype, key_dim, backend, expected, lift, pad):
    d = dispatch.decide(op, plat, dtype, key_dim, backend)
    assert (d.backend, d.lift_640, d.pad_key_to) == (expected, lift, pad), d.reason
    assert d.reason and "\n" not in d.reason


def test_key_tile_and_versions():
    assert [dispatch.key_tile(k, H100) for k in (16, 32, 64, 65, 128, 256)] == [16, 32, 64, 128, 128, 128]
    assert dispatch.version("3.6.0+git1234") == (3, 6, 0) and dispatch.version("3.7.1rc1") == (3, 7, 1)
    assert dispatch.version("2.13.0+cpu") < (3, 4, 0)


def float64_call(op: str, inputs: tuple[str, ...], q_shape: tuple[int, int], v_shape: tuple[int, int]) -> dispatch.OpCall:
    return dispatch.OpCall("?", op, tuple((n, torch.float64) for n in inputs), q_shape, v_shape)


def test_check_against_torch_passes_the_same_op_and_catches_a_wrong_one():
    args = dispatch._inputs(float64_call("chunk_delta_rule", ("q", "k", "v", "beta"), (2, 16), (2, 16)), torch.device("cpu"), T=20)
    torch_op = chunk_delta_rule.torch_op
    passed, err = dispatch.check_against_torch(torch_op, torch_op, args)
    assert passed and err < 1e-12

    def wrong(**kw):
        o, s = torch_op(**kw)
        return o * 1.2, s

    passed, err = dispatch.check_against_torch(wrong, torch_op, args)
    assert not passed and err > 0.1


def test_check_inputs_are_packed_documents_as_in_training():
    """The check runs the layout training runs (so its autotuning is training's): a kernel that
    let state cross the document boundary fails it."""
    args = dispatch._inputs(float64_call("chunk_gated_delta_rule", ("q", "k", "v", "g", "beta"), (2, 16), (2, 32)), torch.device("cpu"), T=40)
    assert args["cu_seqlens"].dtype == torch.int32 and args["cu_seqlens"].tolist() == [0, 14, 40]
    torch_op = chunk_gated_delta_rule.torch_op

    def one_document(**kw):
        return torch_op(**{**kw, "cu_seqlens": None})

    assert dispatch.check_against_torch(torch_op, torch_op, args)[0]
    passed, err = dispatch.check_against_torch(one_document, torch_op, args)
    assert not passed and err > 0.05


def test_cpu_header_says_torch_everywhere(monkeypatch):
    model = HybridLM(tiny_model_config("MTG*"))
    monkeypatch.setenv("EBB_OPS_BACKEND", "auto")
    assert plan_model(model, torch.device("cpu"), torch.float32) == "ebb: ops: PyTorch for every mixer (device cpu)"


def test_recording_names_each_mixer_and_its_op_shapes():
    model = HybridLM(tiny_model_config("MTG*"))
    with dispatch.recording(model) as calls, torch.no_grad():
        model(torch.zeros(1, 16, dtype=torch.long))
    seen = {(call.kind, call.op) for call in calls}
    assert seen == {("M", "chunk_simple_gla"), ("T", "chunk_delta_rule"), ("G", "chunk_gated_delta_rule")}
    assert dispatch._calls is None


def test_the_check_gets_each_input_in_the_dtype_training_gives_the_op():
    """The probe notes each input's dtype as the op receives it (here a bf16 model: Gated DeltaNet's
    beta in float32 beside bf16 activations), and the check's inputs take them, so that it
    autotunes the kernels at training's keys."""
    model = HybridLM(tiny_model_config("G")).to(torch.bfloat16)
    with dispatch.recording(model) as calls, torch.no_grad():
        model(torch.zeros(1, 16, dtype=torch.long))
    (call,) = calls
    received = dict(call.dtypes)
    assert received == {"q": torch.bfloat16, "k": torch.bfloat16, "v": torch.bfloat16, "g": torch.bfloat16, "beta": torch.float32}
    args = dispatch._inputs(call, torch.device("cpu"), T=40)
    assert {n: t.dtype for n, t in args.items() if n != "cu_seqlens"} == received
    assert args["q"].shape[2:] == call.q_shape and args["v"].shape[2:] == call.v_shape


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("EBB_OPS_BACKEND", "triton")
    with pytest.raises(ValueError, match="EBB_OPS_BACKEND must be one of auto, torch, fla"):
        dispatch.backend_override()


@pytest.fixture
def fake_hopper(monkeypatch):
    """A Hopper with Triton 3.6 and fla, whose 'kernels' are ebb's PyTorch ops, and fla's #640
    guard as a stand-in module; decisions and checks start afresh."""
    guard = types.ModuleType("fla.ops.common.chunk_o")
    guard.TRITON_ABOVE_3_7_1 = False
    monkeypatch.setitem(sys.modules, "fla.ops.common.chunk_o", guard)
    monkeypatch.setattr(dispatch, "platform_of", lambda device: platform())
    monkeypatch.setattr(dispatch, "fla_kernel", lambda op: TORCH_OPS[op])
    monkeypatch.setattr(dispatch, "_check_errors", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("EBB_OPS_BACKEND", "auto")
    dispatch._decision.cache_clear()
    yield guard
    dispatch._decision.cache_clear()


TORCH_OPS = {"chunk_gated_delta_rule": chunk_gated_delta_rule.torch_op, "chunk_delta_rule": chunk_delta_rule.torch_op}
GDN_CALL = dispatch.OpCall("G", "chunk_gated_delta_rule", tuple((n, torch.float64) for n in ("q", "k", "v", "g", "beta")), (2, 16), (4, 8))


def check_on_cpu(monkeypatch) -> None:
    """The start-up check's inputs on the CPU, in float64, which only a forced fla accepts."""
    inputs = dispatch._inputs
    monkeypatch.setattr(dispatch, "_inputs", lambda call, device: inputs(call, torch.device("cpu"), T=40))
    monkeypatch.setenv("EBB_OPS_BACKEND", "fla")


def test_a_lifted_guard_runs_fla_only_once_its_check_passed(fake_hopper, monkeypatch):
    op, cuda, cuda0 = "chunk_gated_delta_rule", torch.device("cuda"), torch.device("cuda", 0)
    check_on_cpu(monkeypatch)
    assert dispatch.decision(op, cuda0, torch.float64, 16).backend == "torch"  # not checked yet
    d = dispatch.checked_decision(GDN_CALL, cuda, TORCH_OPS[op])
    assert (d.backend, d.pad_key_to) == ("fla", 128) and "checked against torch, rel err" in d.reason
    assert dispatch.decision(op, cuda0, torch.float64, 16) == d  # 'cuda' at start-up and 'cuda:0' at run time: one decision
    assert fake_hopper.TRITON_ABOVE_3_7_1


def test_a_failed_check_runs_torch_and_leaves_flas_guard_in_place(fake_hopper, monkeypatch):
    op = "chunk_gated_delta_rule"

    def miscompiled(**kw):
        o, s = TORCH_OPS[op](**kw)
        return o * 1.5, s

    monkeypatch.setattr(dispatch, "fla_kernel", lambda name: miscompiled)
    check_on_cpu(monkeypatch)
    d = dispatch.checked_decision(GDN_CALL, torch.device("cuda"), TORCH_OPS[op])
    assert d.backend == "torch" and "failed its check" in d.reason
    assert not fake_hopper.TRITON_ABOVE_3_7_1


@pytest.mark.parametrize("op", ["chunk_gated_delta_rule", "chunk_delta_rule"])
def test_padding_the_key_dim_is_exact(fake_hopper, op):
    """fla's call with q, k and the state zero-padded in their key dim gives the unpadded op's
    output, final state and every gradient (float64; GVA: 2 q/k heads, 4 value heads)."""
    g = torch.Generator().manual_seed(0)
    T, H, HV, K, V = 40, 2, 4, 16, 8
    args = {
        "q": torch.nn.functional.normalize(torch.randn(1, T, H, K, generator=g, dtype=torch.float64), dim=-1),
        "k": torch.nn.functional.normalize(torch.randn(1, T, H, K, generator=g, dtype=torch.float64), dim=-1),
        "v": torch.randn(1, T, HV, V, generator=g, dtype=torch.float64),
        "beta": torch.rand(1, T, HV, generator=g, dtype=torch.float64),
        "initial_state": torch.randn(2, HV, K, V, generator=g, dtype=torch.float64),
    }
    if op == "chunk_gated_delta_rule":
        args["g"] = -torch.rand(1, T, HV, generator=g, dtype=torch.float64)
    else:  # no GVA in the delta rule
        args["v"], args["beta"], args["initial_state"] = args["v"][:, :, :H], args["beta"][:, :, :H], args["initial_state"][:, :H]
    cu_seqlens = torch.tensor([0, 13, T])
    results = []
    for pad in (None, 64):
        leaves = {n: t.clone().requires_grad_() for n, t in args.items()}
        out, final = dispatch.run_fla(op, {**leaves, "cu_seqlens": cu_seqlens, "output_final_state": True, "chunk_size": 16}, pad)
        assert final.shape == args["initial_state"].shape
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)).sum().add(final.square().sum()).backward()
        results.append([out, final] + [leaves[n].grad for n in args])
    for padded, plain in zip(*results):
        torch.testing.assert_close(padded, plain, rtol=1e-12, atol=1e-12)


def test_fla_call_is_one_graph_break_under_compile(monkeypatch):
    """In a compiled block the decision is a constant of the graph and fla's call one eager region."""
    monkeypatch.setattr(dispatch, "fla_padding", torch.compiler.assume_constant_result(lambda op, x: (True, None)))
    monkeypatch.setattr(dispatch, "fla_kernel", lambda op: TORCH_OPS[op])
    args = dispatch._inputs(GDN_CALL, torch.device("cpu"), T=40)

    def block(q, k, v, g, beta, cu_seqlens):
        return chunk_gated_delta_rule(q.sin(), k, v, g, beta, scale=0.25, cu_seqlens=cu_seqlens)[0].cos()

    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(**args)
    assert explained.graph_break_count == 1, [b.reason for b in explained.break_reasons]


def test_planned_calls_record_a_forward_then_check_each_op(fake_hopper, monkeypatch):
    check_on_cpu(monkeypatch)
    model = HybridLM(tiny_model_config("G")).double()
    planned = dispatch.planned_calls(model, lambda: model(torch.zeros(1, 16, dtype=torch.long)), torch.device("cuda"), TORCH_OPS)
    ((call, d),) = planned
    assert (call.kind, call.op) == ("G", "chunk_gated_delta_rule")
    assert d.backend == "fla" and d.pad_key_to == 128 and "checked against torch" in d.reason
