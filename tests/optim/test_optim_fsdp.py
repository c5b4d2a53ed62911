"""Quantised optimizer states under FSDP2 (dp_shard=2) and tp 2 x FSDP2 (real gloo processes)
against one process with the same codec, seed and global batch, and a checkpoint saved under
dp_shard=2 resumed in one process.

Every tensor is quantised (`optim.min_quant_numel=0`): FSDP2 splits the 1-D ones, and tp 2 the
row-parallel weights (16 of 32 columns), inside blocks, whose statistics the ranks then combine
(optim/shards.py); the other shards hold whole blocks. Either way a rank's shard quantises
exactly as the whole tensor does: the runs differ only by the order of the gradient sums
(float32), as in tests/parallel/test_parallel_train.py. Tolerance: losses within 1e-4 (a rounding
difference can move a code to its neighbour, an lr-sized change of one weight)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dist_cp

from checkpoint.manager import find_latest
from pretrain.config import RunConfig
from pretrain.train import train
from tests.distributed import run_distributed
from tests.runs import curve, layout_config

TOL = 1e-4
pytestmark = pytest.mark.distributed
CODEC = ["model.pattern=RM*TG", "optim.min_quant_numel=0"]


def train_rank(cfg: RunConfig) -> None:
    train(cfg, resume=False)



@pytest.mark.parametrize(
    "dtype, layout, world",
    [("int8", ["parallel.dp_shard=2"], 2), ("fp8", ["parallel.dp_shard=2", "parallel.tp=2"], 4)],
    ids=["int8-fsdp2", "fp8-tp2xfsdp2"],
)
def test_sharded_run_matches_one_process_with_the_same_codec(tmp_path: Path, dtype: str, layout: list[str], world: int) -> None:
    settings = [*CODEC, f"optim.state_dtype={dtype}"]
    run_distributed(train_rank, world, layout_config(tmp_path / "sharded", *settings, *layout, "train.batch_size=2"))
    train(layout_config(tmp_path / "one", *settings, "train.batch_size=4"), resume=False)
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(curve(tmp_path / "sharded", key), curve(tmp_path / "one", key), rtol=0, atol=TOL, msg=key)


def test_save_under_dp2_resume_in_one_process(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """The dp2 checkpoint holds each state under its global shape (the ranks' DTensor shards
    together), and the one-process run resumed from it says that it reshards and takes step 3
    as an uninterrupted one-process run does."""
    settings = [*CODEC, "optim.state_dtype=int8"]
    run_distributed(train_rank, 2, layout_config(tmp_path / "dp2", *settings, "parallel.dp_shard=2", "train.batch_size=2", "train.stop_at_step=2"))
    saved = dist_cp.FileSystemReader(find_latest(tmp_path / "dp2" / "checkpoints")).read_metadata().state_dict_metadata
    weight = "blocks.0.mixer.r_proj.weight"
    rows, columns = saved[f"model.{weight}"].size
    assert saved[f"optimizer.state.{weight}.exp_avg_int8"].size == (rows, columns)
    assert saved[f"optimizer.state.{weight}.exp_avg_sq_int8_absmax"].size == (rows, -(-columns // 256))
    capfd.readouterr()
    train(layout_config(tmp_path / "dp2", *settings, "train.batch_size=4"), resume=True)
    assert "ebb: resharding step-00000002 from dp_shard=2 to one process\n" in capfd.readouterr().out
    train(layout_config(tmp_path / "one", *settings, "train.batch_size=4"), resume=False)
    torch.testing.assert_close(curve(tmp_path / "dp2", "loss"), curve(tmp_path / "one", "loss"), rtol=0, atol=TOL)
