"""SIGKILL a real training process in the middle of a lazy checkpoint's background flush, several
times at different moments (each run resuming from what the previous one left): the newest
committed checkpoint always matches its manifest and loads, and in the end holds exactly what an
uninterrupted run's checkpoint of that step holds. With optimizer offload too, whose state the
flush writes in place while the next steps update it.

The flush is made slow and observable with the lazy writer's test hook (a sleep before each
tensor is written); a kill comes a chosen delay after this run's staging directory gets its
first shard file."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from checkpoint import dcp
from checkpoint.lazy import WRITE_DELAY_ENV
from checkpoint.manager import find_latest, step_dir_name, verify_together
from checkpoint.ranks import Ranks
from models.model import HybridLM
from pretrain.config import load_config
from tests.runs import REPO, SMALL_RUN

RUN = [*SMALL_RUN, "train.steps=1000", "train.eval_interval=0", "checkpoint.interval=1", "checkpoint.mode=lazy"]
OFFLOAD = [  # 80K elements in 20 subgroups, every other one on the "device" side
    "optim.offload.enabled=true", "optim.offload.subgroup_size=4096", "optim.offload.gpu_every_k=2", "optim.offload.host_optimizer=torch",
]
KILL_AFTER = [0.0, 0.25, 0.5, 0.8]  # seconds after the flush (about 0.9 s: ~900 items x 1 ms) started writing


def step_of(checkpoint: Path | None) -> int:
    return 0 if checkpoint is None else int(checkpoint.name.removeprefix("step-"))


def flush_started_after(checkpoints: Path, began: float, committed: int) -> Path | None:
    """A staging directory whose shard file this run has started writing, once this run has
    committed a checkpoint newer than step `committed`."""
    if step_of(find_latest(checkpoints)) <= committed:
        return None
    for shard in checkpoints.glob(".tmp-step-*/__0_0.distcp"):
        try:
            if shard.stat().st_mtime >= began:
                return shard.parent
        except FileNotFoundError:  # committed (renamed) meanwhile
            continue
    return None


def kill_during_flush(run_dir: Path, delay: float, committed: int, run: list[str]) -> str:
    """Start training `run` (resuming if step `committed` was committed), SIGKILL it `delay` s into
    a flush after its first commit; the staging directory it was writing."""
    resume = committed > 0
    began = time.time() - 1  # mtimes may be coarser than time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pretrain.train", *(["--resume"] if resume else []), *run, f"train.run_dir={run_dir}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, WRITE_DELAY_ENV: "0.001"},
    )
    try:
        deadline = time.time() + 120
        while (staging := flush_started_after(run_dir / "checkpoints", began, committed)) is None:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint flush started"
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    return staging.name


def assert_newest_committed_is_intact(checkpoints: Path) -> int:
    latest = find_latest(checkpoints)
    assert latest is not None
    verify_together(Ranks(None), latest)  # sizes and checksums match the manifest
    model = HybridLM(load_config(latest / "config.yaml").model)
    dcp.load_model(latest, model)
    return step_of(latest)


def saved_tensors(checkpoint: Path, into: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's DCP files (model and optimizer), by key."""
    dcp_to_torch_save(checkpoint, into)
    flat, _ = flatten_state_dict(torch.load(into, weights_only=False))
    return {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}


def assert_same_as_an_uninterrupted_run(checkpoint: Path, run: list[str], tmp_path: Path) -> None:
    step = step_of(checkpoint)
    done = subprocess.run(
        [sys.executable, "-m", "pretrain.train", *run, f"train.stop_at_step={step}", f"train.run_dir={tmp_path / 'uninterrupted'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    expected = saved_tensors(tmp_path / "uninterrupted" / "checkpoints" / step_dir_name(step), tmp_path / "expected.pt")
    saved = saved_tensors(checkpoint, tmp_path / "saved.pt")
    assert saved.keys() == expected.keys() and any(".exp_avg" in k for k in saved)
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key


@pytest.mark.slow
@pytest.mark.parametrize("offload", [False, True], ids=["offload-off", "offload-on"])
def test_sigkill_during_a_flush_never_loses_the_last_committed_checkpoint(tmp_path, offload):
    run = RUN + OFFLOAD * offload
    committed = 0
    for delay in KILL_AFTER:
        staging = kill_during_flush(tmp_path / "run", delay, committed, run)
        step = assert_newest_committed_is_intact(tmp_path / "run" / "checkpoints")
        assert committed < step <= int(staging.removeprefix(".tmp-step-"))  # resumed, went on, nothing from the cut flush
        committed = step
    assert_same_as_an_uninterrupted_run(find_latest(tmp_path / "run" / "checkpoints"), run, tmp_path)
