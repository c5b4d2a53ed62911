"""The fla-or-PyTorch decision per op, on fake platforms, and the header line on CPU."""
from __future__ import annotations

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
    "op, plat, dtype, key_dim, backend, expected, lift",
    [
        # fla #640: Hopper, Triton in [3.4.0, 3.7.1), gated ops: tile 64 -> torch, tile 128 -> fla, guard lifted
        ("chunk_gated_delta_rule", platform(), torch.bfloat16, 64, "auto", "torch", False),
        ("chunk_gated_delta_rule", platform(), torch.bfloat16, 128, "auto", "fla", True),
        ("chunk_gated_delta_rule", platform(), torch.bfloat16, 256, "auto", "fla", True),
        ("chunk_simple_gla", platform(), torch.bfloat16, 64, "auto", "torch", False),
        ("chunk_simple_gla", platform(), torch.bfloat16, 128, "auto", "fla", True),
        ("chunk_gated_delta_rule", platform(triton="3.4.0"), torch.bfloat16, 64, "auto", "torch", False),
        ("chunk_gated_delta_rule", platform(triton="3.3.1"), torch.bfloat16, 64, "auto", "fla", False),
        ("chunk_gated_delta_rule", platform(triton="3.7.1"), torch.bfloat16, 64, "auto", "fla", False),
        ("chunk_gated_delta_rule", platform(capability=A100), torch.bfloat16, 64, "auto", "fla", False),
        ("chunk_delta_rule", platform(), torch.bfloat16, 64, "auto", "fla", False),  # not gated: no #640
        ("chunk_rwkv7", platform(), torch.bfloat16, 64, "auto", "fla", False),
        # dtypes fla refuses
        ("chunk_delta_rule", platform(triton="3.7.1"), torch.float32, 128, "auto", "torch", False),
        ("chunk_gated_delta_rule", platform(triton="3.7.1"), torch.float32, 128, "auto", "fla", False),
        ("chunk_gated_delta_rule", platform(triton="3.7.1"), torch.float64, 128, "auto", "torch", False),
        # no fla, no CUDA, forced
        ("chunk_gated_delta_rule", platform(fla=False), torch.bfloat16, 128, "auto", "torch", False),
        ("chunk_gated_delta_rule", platform(cuda=False, capability=None, triton=None), torch.bfloat16, 128, "auto", "torch", False),
        ("chunk_gated_delta_rule", platform(triton="3.7.1"), torch.bfloat16, 128, "torch", "torch", False),
        ("chunk_gated_delta_rule", platform(), torch.bfloat16, 64, "fla", "fla", False),
    ],
)
def test_decide(op, plat, dtype, key_dim, backend, expected, lift):
    d = dispatch.decide(op, plat, dtype, key_dim, backend)
    assert (d.backend, d.lift_640) == (expected, lift), d.reason
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
