"""`python -m pretrain.train --dry-run`: the layout, parameter counts and a memory estimate, with
nothing built, and the one-line errors of a real run; its estimate against the peak a real step of
the quickstart model reaches on the CPU."""
from __future__ import annotations

import re

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from models.model import HybridLM
from optim.adamw import build_optimizer
from pretrain.config import RunConfig, load_config
from pretrain.data import build_data
from pretrain.dry_run import estimate_rank, model_activations
from pretrain.estimate import activation_bytes, meta_model
from pretrain.linear_ce import head_loss, resolve_loss
from pretrain.parallelize import Parallel
from pretrain.runtime import Runtime
from pretrain.step import train_step
from tests.parity import layout
from tests.runs import REPO, assert_one_error, cli

pytestmark = pytest.mark.slow  # seconds each (subprocess runs): CI runs them, the fast loop skips them

QUICKSTART = REPO / "configs" / "quickstart.yaml"
CPU = Runtime(torch.device("cpu"), torch.float32)


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """What the parameters and the optimizer state occupy (each storage once)."""
    tensors = [*model.parameters(), *(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def measured_peak(cfg: RunConfig) -> int:
    """Bytes allocated at the peak of a training step (the production step on the quickstart's
    own packed batches, after a first step has made the optimizer state): what is held before it
    plus the peak of the torch profiler's allocation trace during it."""
    torch.manual_seed(0)
    _, batches, _ = build_data(cfg.data, cfg.train, cfg.model.vocab_size, 0, 1, "cpu")
    model = HybridLM(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    par = Parallel(layout(), module=model, head=head_loss(resolve_loss(cfg.train.loss, "cpu")[0]))  # the loss the estimate counts
    train_step(par, optimizer, batches, cfg.train.grad_accum, cfg.train.grad_clip, CPU)
    held = held_bytes(model, optimizer)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(par, optimizer, batches, cfg.train.grad_accum, cfg.train.grad_clip, CPU)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    allocated = peak = 0
    for event in events:
        allocated += event.nbytes()
        peak = max(peak, allocated)
    return held + peak


def test_the_estimate_is_within_a_quarter_of_the_measured_peak_for_the_quickstart_model():
    cfg = load_config(QUICKSTART, ["data.embedded_max_bytes=400000", "train.device=cpu", "train.dtype=float32"])
    shape = layout()
    activations, _ = model_activations(cfg, shape, torch.float32)
    estimate, _ = estimate_rank(cfg, shape, 0, activations)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak = measured_peak(cfg)
    finally:
        torch.set_num_threads(before)
    ratio = estimate.total / peak
    print(f"dry-run estimate {estimate.total / 2**20:.1f} MiB, measured peak {peak / 2**20:.1f} MiB, ratio {ratio:.3f}")
    assert 0.75 <= ratio <= 1.25


def test_the_activation_estimate_counts_the_loss_the_run_uses():
    """At a 32k vocabulary the whole logits and their gradient are most of a small model's
    activations: the chunked loss's estimate leaves them out."""
    cfg = load_config(QUICKSTART, ["model.vocab_size=32000", "train.device=cpu", "train.dtype=float32"])
    full, chunked = (activation_bytes(meta_model(cfg.model), 4, 256, torch.float32, "none", 1, loss) for loss in ("full", "chunked"))
    logits = 4 * 256 * 32000 * 4  # float32 bytes
    assert full - chunked > logits
    assert model_activations(cfg, layout(), torch.float32)[1].endswith("loss chunked")


def test_the_dry_run_prints_the_layout_counts_and_estimates_and_builds_nothing(tmp_path):
    run_dir = tmp_path / "never-made"
    result = cli(
        "pretrain.train", "--config", str(QUICKSTART), "--dry-run", "--world-size", "4", "parallel.pp=2", "parallel.dp_shard=2",
        "train.seq_len=64", f"train.run_dir={run_dir}",
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    out = result.stdout
    assert "layout: pp 2 x dp_replicate 1 x dp_shard 2 x cp 1 x tp 1 (mesh dims pp, dp_replicate, dp_shard, cp, tp)" in out
    assert "stage 0 on pp rank 0: blocks 0-1 (MT) + embedding" in out and "stage 1 on pp rank 1: blocks 2-3 (G*) + norm, head" in out
    assert "embedding          tied with the head" in out
    total = HybridLM(load_config(QUICKSTART).model).num_params()
    assert re.search(rf"^  total +{total / 1e6:.2f}M$", out, re.MULTILINE)  # the parameters' total (the tied table once)
    assert out.count("memory estimate, each rank of pp rank") == 2 and "optimizer states" in out and "activations" in out
    assert not run_dir.exists()


def test_the_dry_run_stops_with_a_real_runs_one_line_errors(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    for overrides, expected in [
        (["parallel.tp=3"], "world size 1 is not divisible by pp*dp_replicate*tp = 3"),
        ([f"train.run_dir={file}"], f"train.run_dir {file} is a file, not a directory"),
        (["optim.lr=.nan"], "config key optim.lr: Input should be a finite number"),
    ]:
        assert_one_error(cli("pretrain.train", "--config", str(QUICKSTART), "--dry-run", *overrides), expected)
