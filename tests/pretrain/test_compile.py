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
from tests.conftest import every_mixer, tiny_model_config, tiny_model_overrides

pytestmark = pytest.mark.slow  # compiling takes tens of seconds: CI runs these, the fast loop skips them

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


def compiled_forwards(pattern: str, activation_checkpoint: str, layouts: list[list[int]]) -> int:
    """Graphs Dynamo captured over forwards and backwards of a compiled model, one per document
    layout in training, then the first in evaluation, failing on Dynamo's recompile limit."""
    from torch._dynamo.utils import counters

    from parallel.data_parallel import apply_activation_checkpointing
    from pretrain.parallelize import compile_blocks

    torch.manual_seed(0)
    model = HybridLM(tiny_model_config(pattern))
    apply_activation_checkpointing(model, activation_checkpoint)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model, backend="eager")
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for training, documents in [(True, layout) for layout in layouts] + [(False, layouts[0])]:
            model.train(training)
            model(ids, cu_seqlens=torch.tensor(documents, dtype=torch.int32)).sum().backward()
    return counters["stats"]["unique_graphs"]


@pytest.mark.timeout(300)
def test_every_mixer_kind_stays_compiled():
    """A shape change and evaluation recompile each kind's graph: 3 per kind, past Dynamo's default limit of 8."""
    assert compiled_forwards(every_mixer(), "none", [[0, 32, 64], [0, 5, 32, 40, 64]]) > 0


def test_checkpointed_blocks_are_compiled():
    assert compiled_forwards("G*", "full", [[0, 32, 64]]) > 0  # the module inside the checkpoint wrapper
