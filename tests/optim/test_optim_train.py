"""Low-bit optimizer states in training: quickstart-model loss parity with fp32 AdamW, exact
resume from quantised checkpoints, bf16 parameters with master weights, parameter groups
(exclusions, thresholds, embeddings, overrides), and errors."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dist_cp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict

from checkpoint import CheckpointError
from models.model import HybridLM
from optim.adamw import build_optimizer
from optim.config import OptimConfig
from optim.schedules import build_lr_schedule
from pretrain.config import ConfigError, load_config
from pretrain.train import train

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
ALL_MIXERS = REPO / "configs" / "all_mixers.yaml"
QUIET = ["train.threads=1", "logging.tensorboard=false", "logging.progress=false", "train.eval_interval=0", "data.embedded_max_bytes=100000"]
# every tensor quantised, so that a tiny model exercises the codecs everywhere
QUANTISE_ALL = ["optim.min_quant_numel=0"]
TINY = [
    "model.d_model=64", "model.mixers.attention.num_heads=2", "model.mixers.deltanet.num_heads=2",
    "model.mixers.mamba2.head_dim=16", "model.mixers.mamba2.d_state=16", "model.mixers.gated_deltanet.num_heads=2",
    "model.mixers.gated_deltanet.head_dim=16", "train.seq_len=32", "train.batch_size=2", "optim.warmup_steps=2",
]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run(run_dir: Path, *overrides: str, resume: bool = False) -> None:
    train(load_config(QUICKSTART, [*QUIET, f"train.run_dir={run_dir}", *overrides]), resume)


@pytest.mark.slow
def test_200_quickstart_steps_of_int8_and_fp8_end_within_2_percent_of_fp32(tmp_path):
    """The quickstart model and optimizer settings at seq_len 32, batch 4; the final loss is the
    mean of the last 20 steps (one 128-token batch is a noisy sample)."""
    short = ["train.steps=200", "train.seq_len=32", "train.batch_size=4", "optim.warmup_steps=20", "checkpoint.save_final=false", "checkpoint.interval=0"]
    final = {}
    for dtype in ("fp32", "int8", "fp8"):
        run(tmp_path / dtype, *short, f"optim.state_dtype={dtype}")
        curve = losses(tmp_path / dtype)
        assert len(curve) == 200 and sum(curve[-20:]) < 0.6 * sum(curve[:20])  # it learned
        final[dtype] = sum(curve[-20:]) / 20
    for dtype in ("int8", "fp8"):
        assert abs(final[dtype] - final["fp32"]) <= 0.02 * final["fp32"], final


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "lazy"])
@pytest.mark.parametrize("dtype, codes, scales", [("int8", "_int8", ["_int8_absmax"]), ("fp8", "_fp8", ["_fp8_scale", "_fp8_k", "_fp8_centre"])])
def test_quantised_states_are_saved_as_they_are_and_resume_exactly(tmp_path, dtype, codes, scales, mode):
    settings = [*TINY, *QUANTISE_ALL, "train.steps=6", "checkpoint.interval=3", f"optim.state_dtype={dtype}", f"checkpoint.mode={mode}"]
    run(tmp_path / "straight", *settings)
    run(tmp_path / "resumed", *settings, "train.stop_at_step=3")
    run(tmp_path / "resumed", *settings, resume=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")

    saved = dist_cp.FileSystemReader(tmp_path / "straight" / "checkpoints" / "step-00000003").read_metadata().state_dict_metadata
    weight = "optimizer.state.blocks.0.mixer.in_proj.weight.exp_avg"
    assert saved[weight + codes].properties.dtype == torch.uint8
    assert all(saved[weight + scale].properties.dtype == torch.float32 for scale in scales)
    assert weight not in saved and weight + "_sq" not in saved  # nothing dequantised


def test_a_checkpoint_of_one_state_dtype_does_not_load_under_another(tmp_path):
    settings = [*TINY, *QUANTISE_ALL, "train.steps=2", "optim.state_dtype=int8"]
    run(tmp_path, *settings)
    with pytest.raises(CheckpointError, match=r"was saved with another config: optim.state_dtype \('int8' there, 'fp8' here\)"):
        run(tmp_path, *settings, "train.steps=4", "optim.state_dtype=fp8", resume=True)


def test_fp32_states_where_this_run_quantises_stop_with_the_override_that_loads_them(tmp_path, monkeypatch):
    """An ebb that chose codecs by layout kept fp32 states for tensors whose shards split blocks
    (FSDP2's 1-D tensors). Its checkpoint, resumed with the same config, stops with one line
    naming them by glob and the override that keeps them fp32; with that override it resumes."""
    from optim import groups

    settings = [*TINY, *QUANTISE_ALL, "optim.state_dtype=int8"]
    decide = groups.state_dtype_for
    monkeypatch.setattr(groups, "state_dtype_for", lambda param, *args: "fp32" if param.ndim == 1 else decide(param, *args))
    run(tmp_path, *settings, "train.steps=2")
    monkeypatch.undo()
    with pytest.raises(CheckpointError) as refused:
        run(tmp_path, *settings, "train.steps=4", resume=True)
    message = str(refused.value)
    assert "\n" not in message and "holds fp32 optimizer states (exp_avg, exp_avg_sq) for tensors this run keeps in a low-bit codec" in message
    override = re.search(r"optim\.overrides=\[.*\]$", message).group(0)
    assert "{params: 'blocks.*.mixer_norm.weight', state_dtype: fp32}" in override and "mixer.in_proj" not in override
    run(tmp_path, *settings, "train.steps=4", override, resume=True)
    assert len(losses(tmp_path)) == 4


def test_bad_state_dtype_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"^config key optim.state_dtype: .*'int4'"):
        load_config(QUICKSTART, ["optim.state_dtype=int4"])
    with pytest.raises(ConfigError, match=r"optim.overrides.0.params"):
        load_config(QUICKSTART, ["optim.overrides=[{lr_scale: 2.0}]"])


def bf16_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64)).to(torch.bfloat16)


def take_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    model(x).float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", ["int8", "fp8", "bf16"])
def test_bf16_parameters_keep_fp32_master_and_scales_through_save_and_load(dtype):
    cfg = OptimConfig(lr=1e-2, state_dtype=dtype, min_quant_numel=0, master_weights=True)
    model = bf16_model()
    optimizer = build_optimizer(model, cfg)
    for seed in range(2):
        take_step(model, optimizer, seed)
    saved = torch.load(_round_trip(optimizer.state_dict()), weights_only=True)
    first_layer = optimizer.state[model[0].weight]
    assert first_layer["master"].dtype == torch.float32
    assert not torch.equal(first_layer["master"].to(torch.bfloat16).float(), first_layer["master"])  # more than bf16 holds

    restored = bf16_model()
    restored.load_state_dict(model.state_dict())
    reloaded = build_optimizer(restored, cfg)
    reloaded.load_state_dict(saved)
    for key, value in first_layer.items():
        again = reloaded.state[restored[0].weight][key]
        assert again.dtype == value.dtype and torch.equal(again, value), key
    take_step(model, optimizer, 2)
    take_step(restored, reloaded, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), restored.parameters()))


def _round_trip(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_dcp_state_dict_of_a_fresh_optimizer_creates_states_without_moving_parameters(dtype):
    """DCP's get_state_dict steps a fresh optimizer with zero gradients and lr 0 to create its state."""
    model = bf16_model()
    optimizer = build_optimizer(model, OptimConfig(state_dtype=dtype, min_quant_numel=0, master_weights=True))
    before = [p.clone() for p in model.parameters()]
    _, optim_state = get_state_dict(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert optim_state["state"]["0.weight"][f"exp_avg_{dtype}"].dtype == torch.uint8


EXCLUDED_BY_NAME = {"A_log", "dt_bias", "D", "mu", "w0", "a0", "k_k", "k_a", "r_k", "v0", "mu_k"}


def test_weight_decay_skips_norms_biases_and_marked_parameters_of_every_mixer():
    cfg = load_config(ALL_MIXERS)
    model = HybridLM(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    names = {id(p): name for name, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    expected = {n for n, p in model.named_parameters() if p.ndim < 2 or n.rsplit(".", 1)[-1] in EXCLUDED_BY_NAME}
    assert no_decay == expected
    mixers = {type(block.mixer).__name__ for block in model.blocks}
    marked = {n.rsplit(".", 1)[-1] for n in no_decay if model.get_parameter(n).ndim >= 2}
    assert {"Mamba2", "RWKV7"} <= mixers and {"mu", "r_k"} <= marked  # RWKV-7's [.., C] vectors of ndim >= 2
    assert {"A_log", "dt_bias", "D"} <= {n.rsplit(".", 1)[-1] for n in no_decay}


def test_groups_thresholds_embeddings_overrides_and_scaled_schedule():
    overrides = "optim.overrides=[{params: 'blocks.0.*', state_dtype: fp8, lr_scale: 2.0}]"
    cfg = load_config(QUICKSTART, ["optim.state_dtype=int8", "optim.fp32_embedding_states=true", overrides]).optim
    model = HybridLM(load_config(QUICKSTART).model)
    optimizer = build_optimizer(model, cfg)
    dtype_of = {id(p): (g["state_dtype"], g["lr"]) for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        dtype, lr = dtype_of[id(p)]
        if name == "embed.weight" or p.numel() < cfg.min_quant_numel:
            assert dtype == "fp32", name
        else:
            assert dtype == ("fp8" if name.startswith("blocks.0.") else "int8"), name
        assert lr == pytest.approx(cfg.lr * (2.0 if name.startswith("blocks.0.") else 1.0))
    assert optimizer.param_groups[0]["lr"] == cfg.lr and optimizer.param_groups[0]["state_dtype"] == "int8"
    schedule = build_lr_schedule(optimizer, 100, **cfg.schedule_options)
    for _ in range(10):
        optimizer.step()
        schedule.step()
    assert all(g["lr"] == pytest.approx(g["initial_lr"] * schedule.get_last_lr()[0] / cfg.lr) for g in optimizer.param_groups)
