"""Interleaved optimizer offload on the CPU (host and "device" both the CPU, transfers plain
copies): parity with ebb's AdamW, the performance model, checkpoints and resume (with offload
toggled, another subgroup size), the start-up decisions and the one-line errors."""
from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import optim.offload.optimizer as offload_optimizer
from optim.adamw import AdamW, build_optimizer
from optim.config import OptimConfig
from optim.offload import OffloadAdamW, OffloadError, choose_host, measure_rates
from optim.offload.host import build_host
from optim.offload.model import Rates, choose_k, hidden, on_device
from pretrain.config import load_config
from pretrain.train import train
from tests.runs import SMALL_RUN, assert_one_error, cli

TOL = 1e-6
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.Linear(64, 8)).to(dtype)


def optim_config(**offload) -> OptimConfig:
    """Decay on matrices, none on the norm and biases, a doubled lr on the last layer: three groups."""
    return OptimConfig(lr=1e-2, overrides=[{"params": "2.*", "lr_scale": 2.0}], offload=offload)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 5, clip: float = 0.5) -> None:
    """`steps` steps of two accumulated micro-batches each, clipped as pretrain.step clips."""
    from pretrain.step import clip_gradients

    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for _ in range(2):
            x = torch.randn(4, 16, generator=data).to(next(model.parameters()).dtype)
            model(x).float().pow(2).mean().backward()
        clip_gradients(model, optimizer, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def reference(dtype: torch.dtype = torch.float32, master: bool = False, steps: int = 5) -> nn.Module:
    model = mlp(dtype)
    cfg = optim_config()
    cfg.master_weights = master
    train_steps(model, build_optimizer(model, cfg), steps)
    return model


@pytest.mark.parametrize(
    "subgroup_size, k",
    [(10**6, 0), (300, 0), (300, 1), (300, 2), (1000, 3), (10**6, 1), (257, 5), (300, "auto")],
    ids=["one-host", "all-host", "all-device", "k2", "k3", "one-device", "k5-odd-cuts", "auto"],
)
def test_five_steps_give_adamw_parameters(subgroup_size, k):
    want = reference()
    model = mlp()
    optimizer = build_optimizer(model, optim_config(enabled=True, subgroup_size=subgroup_size, gpu_every_k=k, host_optimizer="torch"))
    assert isinstance(optimizer, OffloadAdamW)
    train_steps(model, optimizer)
    for a, b in zip(model.parameters(), want.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_accumulated_gradients_are_copied_to_the_host_once_per_step(monkeypatch):
    model = mlp()
    optimizer = build_optimizer(model, optim_config(enabled=True, subgroup_size=300, gpu_every_k=0, host_optimizer="torch"))
    optimizer.backwards_per_step = 2  # as pretrain.train sets it for train.grad_accum=2
    copies = []
    to_grads = lambda dst: dst.untyped_storage().data_ptr() == optimizer.grad.untyped_storage().data_ptr()  # noqa: E731
    monkeypatch.setattr(offload_optimizer, "copy", lambda dst, src: (copies.append(dst.numel() if to_grads(dst) else 0), dst.copy_(src)))
    train_steps(model, optimizer, steps=2)
    host_numel = sum(piece.stop - piece.start for pieces in optimizer.host_pieces.values() for piece in pieces)
    assert sum(copies) == 2 * host_numel  # two steps, one copy of each piece each, not one per micro-batch
    for a, b in zip(model.parameters(), reference(steps=2).parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_clipping_takes_the_norm_over_every_subgroup():
    """Host subgroups' device gradients are left unclipped; the norm and the result are AdamW's."""
    model = mlp()
    optimizer = build_optimizer(model, optim_config(enabled=True, subgroup_size=300, gpu_every_k=3, host_optimizer="torch"))
    train_steps(model, optimizer, steps=1, clip=1e-3)
    other = mlp()
    ref_opt = build_optimizer(other, optim_config())
    train_steps(other, ref_opt, steps=1, clip=1e-3)
    for a, b in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_bf16_parameters_keep_an_fp32_master_like_master_weights():
    want = reference(torch.bfloat16, master=True)
    model = mlp(torch.bfloat16)
    optimizer = build_optimizer(model, optim_config(enabled=True, subgroup_size=300, gpu_every_k=2, host_optimizer="torch"))
    train_steps(model, optimizer)
    for a, b in zip(model.parameters(), want.parameters()):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=TOL)
    assert optimizer.state[model[0].weight]["master"].dtype == torch.float32


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed (optional: pip install deepspeed)")
def test_deepspeed_host_optimizer_gives_adamw_parameters():
    want = reference()
    model = mlp()
    optimizer = build_optimizer(model, optim_config(enabled=True, subgroup_size=300, gpu_every_k=3, host_optimizer="deepspeed"))
    train_steps(model, optimizer)
    for a, b in zip(model.parameters(), want.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_state_dict_is_adamw_layout_made_of_the_host_buffers():
    model = mlp()
    optimizer = build_optimizer(model, optim_config(enabled=True, subgroup_size=300, gpu_every_k=2, host_optimizer="torch"))
    train_steps(model, optimizer, steps=2)
    state = optimizer.state_dict()["state"]
    for index, p in enumerate(model.parameters()):
        assert set(state[index]) == {"step", "exp_avg", "exp_avg_sq"}
        assert state[index]["exp_avg"].untyped_storage().data_ptr() == optimizer.exp_avg.untyped_storage().data_ptr()  # no copy
        assert state[index]["exp_avg"].shape == p.shape
    assert all(int(s["step"]) == 2 for s in state.values())


@pytest.mark.parametrize("into", ["adamw", "offload-other-size"])
def test_state_dict_loads_into_adamw_and_another_subgroup_size(into):
    model = mlp()
    optimizer = build_optimizer(model, optim_config(enabled=True, subgroup_size=300, gpu_every_k=2, host_optimizer="torch"))
    train_steps(model, optimizer, steps=2)
    again = mlp()
    again.load_state_dict(model.state_dict())
    offload = dict(enabled=True, subgroup_size=1000, gpu_every_k=3, host_optimizer="torch") if into != "adamw" else {}
    other = build_optimizer(again, optim_config(**offload))
    other.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as from a file: the live dict holds the host buffers
    assert isinstance(other, AdamW if into == "adamw" else OffloadAdamW)
    train_steps(model, optimizer, steps=1)
    train_steps(again, other, steps=1)
    for a, b in zip(model.parameters(), again.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_the_model_picks_the_smallest_k_whose_transfers_hide():
    # 12 bytes of state in, (k - 1) x 2 bytes of parameters in, per element: k >= 1 + 12 H / (B - 2 H)
    assert choose_k(Rates(host=1e9, device=1e11, bandwidth=25e9), 10**6, 100, 2) == 2
    assert choose_k(Rates(host=2e9, device=1e11, bandwidth=25e9), 10**6, 100, 2) == 3  # 1 + 24/21
    # exactly hidden at k = 3 with fp32 parameters: (12 + 2 x 4) / 10 == 2 / 1
    rates = Rates(host=1e9, device=1e11, bandwidth=10e9)
    assert not hidden(2, rates, 1000, 4) and hidden(3, rates, 1000, 4)
    assert choose_k(rates, 1000, 10, 4) == 3
    assert choose_k(rates, 1000, 2, 4) == 0  # k = 3 needs 3 subgroups: all on the host
    assert choose_k(Rates(host=1e9, device=1e11, bandwidth=4e9), 1000, 100, 4) == 0  # parameters alone fill the link
    assert choose_k(Rates(host=1e9, device=1e9 / 3, bandwidth=1e15), 1000, 100, 4) == 4  # the device update is what must hide
    assert not hidden(1, Rates(1.0, 1e30, 1e30), 1, 2)  # k = 1 has no host time to hide behind


def test_schedule_sends_every_kth_subgroup_to_the_device():
    assert [x for x in range(9) if on_device(x, 3)] == [2, 5, 8]
    assert all(on_device(x, 1) for x in range(5)) and not any(on_device(x, 0) for x in range(5))


@pytest.fixture
def no_deepspeed(monkeypatch):
    """Imports of DeepSpeed fail, as where it is not installed (also after an earlier test's import)."""
    for name in [n for n in sys.modules if n == "deepspeed" or n.startswith("deepspeed.")] + ["deepspeed"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_start_up_measurements_give_the_model_its_rates():
    rates = measure_rates(None, build_host("torch"), torch.device("cpu"), 1 << 16, False)
    assert rates.host > 0 and rates.device > 0 and rates.bandwidth > 0
    assert measure_rates(123.0, build_host("torch"), torch.device("cpu"), 1 << 16, False).host == 123.0


def test_auto_host_falls_back_to_torch_without_deepspeed(no_deepspeed):
    name, rates = choose_host("auto", 1 << 12)
    assert name == "torch" and isinstance(rates["torch"], float) and "not installed" in rates["deepspeed"]


def test_startup_errors_are_one_line(monkeypatch, no_deepspeed):
    with pytest.raises(OffloadError, match=r"^optim.offload.host_optimizer=deepspeed: DeepSpeed is not installed"):
        build_optimizer(mlp(), optim_config(enabled=True, host_optimizer="deepspeed"))
    with pytest.raises(OffloadError, match=r"^optim.offload.subgroup_size=1000: one subgroup's fp32 master and moments take .* GiB of accelerator memory"):
        build_optimizer(mlp(), optim_config(enabled=True, subgroup_size=1000, gpu_every_k=2, host_optimizer="torch", device_memory_gb=1e-6))

    def no_pinned_memory(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory\nmore")

    monkeypatch.setattr(offload_optimizer, "host_empty", no_pinned_memory)
    with pytest.raises(OffloadError, match=r"^cannot allocate .* host memory for the offloaded optimizer state: CUDA error: out of memory$"):
        build_optimizer(mlp(), optim_config(enabled=True, gpu_every_k=0, host_optimizer="torch"))


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_low_bit_states_stay_on_the_device_beside_offloaded_fp32_ones(dtype):
    """Matrices of 1000+ elements keep `dtype` states, stepped by ebb's AdamW where they lie; the
    rest (fp32 states) are offloaded. The whole matches AdamW with the same settings, and its
    state dict loads into AdamW and back."""
    settings = dict(lr=1e-2, state_dtype=dtype, min_quant_numel=1000, overrides=[{"params": "2.*", "lr_scale": 2.0}])
    want = mlp()
    train_steps(want, build_optimizer(want, OptimConfig(**settings)))
    model = mlp()
    optimizer = build_optimizer(model, OptimConfig(**settings, offload=dict(enabled=True, subgroup_size=300, gpu_every_k=2, host_optimizer="torch")))
    assert "low-bit states of 1.02K elements stay on the accelerator" in optimizer.header
    assert f"exp_avg_{dtype}" in optimizer.state[model[0].weight] and "exp_avg" in optimizer.state[model[2].weight]
    train_steps(model, optimizer)
    for a, b in zip(model.parameters(), want.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)
    plain = build_optimizer(mlp(), OptimConfig(**settings))
    plain.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    optimizer.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert optimizer.state[model[0].weight] is optimizer.on_device.state[model[0].weight]
    assert all(a is b for a, b in zip(optimizer.on_device.param_groups, (g for g in optimizer.param_groups if g["state_dtype"] != "fp32")))


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss" in line]


def run(run_dir: Path, *overrides: str, resume: bool = False) -> None:
    train(load_config(None, [*SMALL_RUN, f"train.run_dir={run_dir}", "logging.tensorboard=false", *overrides]), resume)


OFFLOAD = ["optim.offload.enabled=true", "optim.offload.subgroup_size=5000", "optim.offload.gpu_every_k=2", "optim.offload.host_optimizer=torch"]


@pytest.mark.slow
def test_checkpoint_and_resume_with_offload_give_identical_losses(tmp_path):
    run(tmp_path / "straight", *OFFLOAD)
    run(tmp_path / "resumed", *OFFLOAD, "train.stop_at_step=4")
    run(tmp_path / "resumed", *OFFLOAD[:1], "optim.offload.subgroup_size=3000", "optim.offload.gpu_every_k=3", resume=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


INT8 = ["optim.state_dtype=int8", "optim.min_quant_numel=1024"]


@pytest.mark.slow
def test_checkpoint_and_resume_with_offload_and_low_bit_states(tmp_path):
    run(tmp_path / "straight", *OFFLOAD, *INT8)
    run(tmp_path / "resumed", *OFFLOAD, *INT8, "train.stop_at_step=4")
    run(tmp_path / "resumed", *OFFLOAD, *INT8, resume=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


@pytest.mark.parametrize(
    "before, after, common", [(OFFLOAD, [], []), ([], OFFLOAD, []), ([], OFFLOAD, INT8)], ids=["offload-then-off", "off-then-offload", "int8-off-then-offload"],
)
@pytest.mark.slow
def test_resume_toggling_offload(tmp_path, before, after, common):
    run(tmp_path / "straight", *common)
    run(tmp_path / "resumed", *before, *common, "train.stop_at_step=4")
    run(tmp_path / "resumed", *after, *common, resume=True)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "resumed")), torch.tensor(losses(tmp_path / "straight")), rtol=0, atol=TOL)


@pytest.mark.slow
def test_header_and_bad_input_on_the_command_line(tmp_path):
    result = cli("pretrain.train", *SMALL_RUN, f"train.run_dir={tmp_path / 'ok'}", "train.steps=1", *OFFLOAD)
    assert result.returncode == 0, result.stderr[-2000:]
    header = [line for line in result.stdout.splitlines() if line.startswith("ebb: offload:")]
    assert len(header) == 1 and "no accelerator, host and device are both the CPU" in header[0] and "k=2" in header[0]
    result = cli("pretrain.train", *SMALL_RUN, f"train.run_dir={tmp_path / 'bad'}", *OFFLOAD, "optim.offload.device_memory_gb=1e-6")
    assert_one_error(result, "optim.offload.subgroup_size=5000: one subgroup's fp32 master and moments take")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("subgroup_size, k", [(10**7, 0), (100_000, 0), (100_000, 1), (100_000, 2), (70_001, 3)])
def test_cuda_streams_give_adamw_parameters(subgroup_size, k):
    """On a GPU: pinned host state, side-stream prefetch, write-back and uploads, gradients copied
    during backward; against ebb's AdamW on the GPU (torch's fused CUDA kernel there)."""
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(256, 1024), nn.LayerNorm(1024), nn.Linear(1024, 256)).cuda()

    def steps(net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from pretrain.step import clip_gradients

        data = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(5):
            for _ in range(2):
                net(torch.randn(8, 256, device="cuda", generator=data)).pow(2).mean().backward()
            clip_gradients(net, optimizer, 0.05)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    want, got = model(), model()
    steps(want, build_optimizer(want, OptimConfig(lr=1e-2)))
    offload = dict(enabled=True, subgroup_size=subgroup_size, gpu_every_k=k, host_optimizer="torch")
    optimizer = build_optimizer(got, OptimConfig(lr=1e-2, offload=offload))
    assert optimizer.master.is_pinned()
    steps(got, optimizer)
    for a, b in zip(got.parameters(), want.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
