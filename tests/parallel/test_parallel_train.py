"""The train loop (`pretrain.train.train`) under tp x pp x dp in 4 real gloo processes against one
process with the same seed and the same global batch (dp_size * train.batch_size rows), and
checkpoints saved under tp 2 x pp 2 loaded in one process; launch/torchrun.sh with 2 processes.

Tolerance: float32; per-step losses and gradient norms within 5e-5 (the same computation: only the
order of sums over heads, vocabulary shards, dp ranks and microbatches differs). Loaded logits
within 1e-5 of the ones the ranks' own weights give (DCP only moves bytes)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from checkpoint import Ranks, verify_together
from checkpoint.dcp import load_model
from checkpoint.manager import find_latest
from models.model import HybridLM
from parallel.mesh import ParallelError
from pretrain.config import RunConfig
from pretrain.data.loader import TokenBatches, tokenize_documents
from pretrain.data.tokenizer import ByteTokenizer
from pretrain.parallelize import parallelize, start
from pretrain.runtime import set_up
from pretrain.train import train
from tests.distributed import run_distributed
from tests.runs import LAYOUT_RUN, REPO, curve, layout_config, records

TOL, LOGITS_TOL = 5e-5, 1e-5


def train_rank(cfg: RunConfig) -> None:
    train(cfg, resume=False)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "pattern, layout, batch_size, eval_interval",
    [
        ("RM*OTGS", ["parallel.tp=2", "parallel.dp_shard=2"], 2, 3),
        ("RM*OTGS", ["parallel.tp=2", "parallel.dp_shard=2", "parallel.sequence_parallel=true"], 2, 0),
        ("RM*O | RTGS", ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=1"], 2, 3),
        ("RM*O | RTGS", ["parallel.pp=2", "parallel.dp_shard=2"], 2, 3),
        ("RM*O | RTGS", ["parallel.pp=2", "parallel.dp_shard=2", "model.tie_embeddings=true"], 2, 0),
    ],
    ids=["tp2xdp2", "tp2xdp2_sp", "pp2xtp2", "pp2xdp2", "pp2xdp2_tied"],
)
def test_layout_matches_one_process(tmp_path: Path, pattern: str, layout: list[str], batch_size: int, eval_interval: int) -> None:
    """Every mixer; R blocks on both sides of the stage cut pass v_first across it. tp x dp,
    pp x tp and pp x dp also evaluate (the vocabulary-parallel chunked loss; under PP through the
    schedule's forward); every run saves a checkpoint with all 4 ranks."""
    common = [f"model.pattern={pattern}", f"train.eval_interval={eval_interval}", *(o for o in layout if o.startswith("model."))]
    parallel_cfg = layout_config(tmp_path / "parallel", *common, *layout, f"train.batch_size={batch_size}", "train.eval_batches=4")
    run_distributed(train_rank, 4, parallel_cfg)
    dp = 2 if "parallel.dp_shard=2" in layout else 1  # evaluation batches have train.batch_size rows: evaluate the same rows
    train(layout_config(tmp_path / "one", *common, f"train.batch_size={dp * batch_size}", f"train.eval_batches={4 // dp}"), resume=False)
    for key in ("loss", "grad_norm", "eval_loss"):
        torch.testing.assert_close(curve(tmp_path / "parallel", key), curve(tmp_path / "one", key), rtol=0, atol=TOL, msg=key)
    assert len(curve(tmp_path / "parallel", "loss")) == 3
    assert len(curve(tmp_path / "parallel", "eval_loss")) == (1 if eval_interval == 3 else 0)
    assert find_latest(tmp_path / "parallel" / "checkpoints").name == "step-00000003"


SAVE_LOAD = ["model.pattern=RM*O | RTGS", "train.steps=4", "train.batch_size=2"]
TP2_PP2 = ["parallel.tp=2", "parallel.pp=2", "parallel.dp_shard=1"]


def reloaded_full_weights(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """This rank's weights after loading the run's last checkpoint back into the same layout, as
    full tensors under the single-process names."""
    train(cfg, resume=False)
    runtime = set_up(cfg.train)
    par = start(cfg, runtime)
    parallelize(par, HybridLM(cfg.model), cfg, runtime)
    load_model(find_latest(Path(cfg.train.run_dir) / "checkpoints"), par.module)
    return {name: value.full_tensor() for name, value in par.module.state_dict().items()}


@pytest.mark.distributed
def test_save_under_tp2_pp2_load_in_one_process(tmp_path: Path) -> None:
    """Weights: one process loading the tp2 x pp2 checkpoint has exactly the weights (and so the
    logits) that the 4 ranks hold. Optimizer and data state: one process resuming it takes step 4
    as an uninterrupted one-process run does. Every mixer is in the model (Mamba2's
    fused in_proj is stored group-major, the same under every tp)."""
    cfg = layout_config(tmp_path / "tp2pp2", *SAVE_LOAD, *TP2_PP2, "train.stop_at_step=3")
    per_rank = run_distributed(reloaded_full_weights, 4, cfg)
    held = {name: value for weights in per_rank for name, value in weights.items()}
    one = HybridLM(cfg.model)
    assert held.keys() == one.state_dict().keys()
    checkpoint = find_latest(tmp_path / "tp2pp2" / "checkpoints")
    load_model(checkpoint, one)
    ranks = HybridLM(cfg.model)
    ranks.load_state_dict(held)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(one(ids), ranks(ids), rtol=0, atol=LOGITS_TOL)

    train(layout_config(tmp_path / "tp2pp2", *SAVE_LOAD), resume=True)  # one process, from the tp2 x pp2 checkpoint
    train(layout_config(tmp_path / "one", *SAVE_LOAD), resume=False)
    torch.testing.assert_close(curve(tmp_path / "tp2pp2", "loss"), curve(tmp_path / "one", "loss"), rtol=0, atol=TOL)


def test_data_parallel_ranks_read_disjoint_rows_of_the_global_batch() -> None:
    """Rank r of 2 reads rows 2r, 2r+1 of what one process with twice the batch reads, every step."""
    docs = tokenize_documents(ByteTokenizer(), [f"document {i} " * (i + 3) for i in range(40)])
    one = TokenBatches(docs, 8, 4, seed=0, eos_id=ByteTokenizer().eos_id)
    ranks = [TokenBatches(docs, 8, 2, seed=0, eos_id=ByteTokenizer().eos_id, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(2 * one.rows_per_epoch // 4 + 1):  # across an epoch boundary
        whole, parts = next(one), [next(r) for r in ranks]
        assert torch.equal(torch.cat([p.input_ids for p in parts]), whole.input_ids)
        assert torch.equal(torch.cat([p.labels for p in parts]), whole.labels)
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()


def test_layout_errors_come_before_any_process_group(tmp_path: Path) -> None:
    with pytest.raises(ParallelError, match="world size 1 is not divisible by pp\\*dp_replicate\\*tp = 2"):
        train(layout_config(tmp_path, "model.pattern=M*TG", "parallel.tp=2"), resume=False)


@pytest.mark.distributed
def test_launch_script_runs_two_processes_and_shows_rank_0(tmp_path: Path) -> None:
    """launch/torchrun.sh: 2 processes (FSDP 2); only local rank 0 on the console, as one process
    prints, every rank's output in LOG_DIR; a layout that cannot run is one `error:` line in all
    (not one per rank, nor torchrun's report) and exit code 2."""
    env = {**os.environ, "NPROC": "2", "LOG_DIR": str(tmp_path / "logs")}
    args = ["bash", "launch/torchrun.sh", "configs/quickstart.yaml", *LAYOUT_RUN, "train.steps=2", f"train.run_dir={tmp_path / 'run'}"]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    header = next(line for line in result.stdout.splitlines() if line.startswith("ebb: "))  # as one process prints it
    assert "dp_shard 2" in header and "[default" not in result.stdout
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2]
    assert {p.parent.name for p in (tmp_path / "logs").glob("*/attempt_0/*/stdout.log")} == {"0", "1"}
    bad = subprocess.run([*args, "parallel.tp=3"], cwd=REPO, env={**env, "LOG_RANKS": ""}, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr == "error: world size 2 is not divisible by pp*dp_replicate*tp = 3 (dp_shard = -1 takes the rest)\n"
    file = tmp_path / "file"
    file.write_text("x")  # an error the ranks agree on once their process group is up
    agreed = subprocess.run([*args, f"train.run_dir={file}"], cwd=REPO, env={**env, "LOG_RANKS": ""}, capture_output=True, text=True, timeout=300)
    assert agreed.returncode == 2 and agreed.stderr == f"error: train.run_dir {file} is a file, not a directory\n", agreed.stderr[-2000:]


@pytest.mark.distributed
def test_sigterm_through_the_launch_script_saves_and_exits_143(tmp_path: Path) -> None:
    """A scheduler's SIGTERM to the launcher's process group: torchrun passes it to the ranks,
    which agree on the step to stop after, save it together and exit; one line, status 143."""
    env = {**os.environ, "NPROC": "2", "LOG_DIR": str(tmp_path / "logs")}
    run_dir = tmp_path / "run"
    args = ["bash", "launch/torchrun.sh", "configs/quickstart.yaml", *LAYOUT_RUN, "train.steps=100000", "checkpoint.interval=1000", f"train.run_dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() or len(records(run_dir)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    step = records(run_dir)[-1]["step"]
    saved = run_dir / "checkpoints" / f"step-{step:08d}"
    assert proc.returncode == 143 and err == f"ebb: SIGTERM after step {step}: saved {saved}; continue with --resume\n", err[-2000:]
    verify_together(Ranks(None), saved)
