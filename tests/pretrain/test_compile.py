"""train.compile: per-block torch.compile and the compiled loss give eager's losses (CPU)."""
from __future__ import annotations

import pytest
import torch

from models.model import HybridLM
from pretrain.config import build_config
from pretrain.data.packing import Batch
from pretrain.parallelize import Parallel, fast_path_header, parallelize
from pretrain.runtime import Runtime
from pretrain.step import train_step
from tests.conftest import tiny_model_overrides

SHAPE = {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1}


def losses(compile: bool, loss: str) -> list[float]:
    cfg = build_config({}, [*tiny_model_overrides("G*"), f"train.compile={str(compile).lower()}", f"train.loss={loss}"])
    torch.manual_seed(0)
    model = HybridLM(cfg.model)
    par, runtime = Parallel(dict(SHAPE)), Runtime(torch.device("cpu"), torch.float32)
    parallelize(par, model, cfg, runtime)
    assert ("torch.compile: each block and the loss" in fast_path_header(par, cfg)) == compile
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 17), generator=gen)
    batch = Batch(ids[:, :-1], ids[:, 1:], torch.tensor([0, 16, 32], dtype=torch.int32))
    return [train_step(par, optimizer, iter([batch]), 1, 1.0, runtime).loss.item() for _ in range(3)]


@pytest.mark.timeout(300)
def test_compiled_blocks_and_loss_match_eager():
    eager = losses(False, "chunked")
    assert eager == pytest.approx(losses(False, "full"), rel=1e-5)
    assert losses(True, "chunked") == pytest.approx(eager, rel=1e-4)
