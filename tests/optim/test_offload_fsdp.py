"""Interleaved offload under FSDP2 (dp_shard=2) and tensor parallelism (tp=2), real gloo
processes: each rank offloads its own shards, and the losses and gradient norms are those of one process without offload on the same
global batch; a checkpoint saved by the offloaded ranks resumes in one process without offload.
The runs differ by the order of the gradient sums (float32) and by the AdamW kernel (the host's
fused one against the layout runs' foreach one): within 5e-5, tests/parallel/test_parallel_train.py's
tolerance."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.config import RunConfig
from pretrain.train import train
from tests.distributed import run_distributed
from tests.runs import curve, layout_config

TOL = 5e-5
pytestmark = pytest.mark.distributed
# small subgroups that cut parameters, every other one on the "device"; host optimizer pinned
OFFLOAD = ["optim.offload.enabled=true", "optim.offload.subgroup_size=4000", "optim.offload.gpu_every_k=2", "optim.offload.host_optimizer=torch"]


def train_rank(cfg: RunConfig) -> None:
    train(cfg, resume=False)


def test_fsdp2_offload_matches_one_process_without_it(tmp_path: Path) -> None:
    run_distributed(train_rank, 2, layout_config(tmp_path / "sharded", *OFFLOAD, "parallel.dp_shard=2", "train.batch_size=2", "train.stop_at_step=2"))
    train(layout_config(tmp_path / "one", "train.batch_size=4"), resume=False)
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(curve(tmp_path / "sharded", key), curve(tmp_path / "one", key)[:2], rtol=0, atol=TOL, msg=key)
    train(layout_config(tmp_path / "sharded", "train.batch_size=4"), resume=True)  # the sharded host states, resharded, offload off
    torch.testing.assert_close(curve(tmp_path / "sharded", "loss"), curve(tmp_path / "one", "loss"), rtol=0, atol=TOL)


@pytest.mark.parametrize(
    "layout, common",
    [
        (["parallel.tp=2"], ["train.batch_size=2", "train.grad_accum=2"]),
        (["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_microbatches=2"], ["model.pattern=RM*O | RTGS", "train.batch_size=4"]),
    ],
    ids=["tp2_accumulating", "pp2"],
)
def test_offload_accumulating_over_micro_batches_matches_one_process_without_it(tmp_path: Path, layout: list[str], common: list[str]) -> None:
    """tp=2: each rank offloads its shards of the column- and row-wise weights and its replicas of
    the rest, over two accumulated micro-batches per step; pp=2: each stage offloads its own
    parameters, over the pipeline's two micro-batches. Either way the hooks copy a gradient to
    the host in the step's last backward, the step anything they missed."""
    common = [*common, "train.stop_at_step=2"]
    run_distributed(train_rank, 2, layout_config(tmp_path / "parallel", *OFFLOAD, *layout, *common))
    train(layout_config(tmp_path / "one", *common), resume=False)
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(curve(tmp_path / "parallel", key), curve(tmp_path / "one", key), rtol=0, atol=TOL, msg=key)
