"""Lazy checkpoints under 2 and 4 gloo processes (FSDP2-sharded model and AdamW state): each save
is committed once, by rank 0, with every rank's shard in the manifest; resuming in the same layout
restores every rank's state exactly, and one process loads the weights (resharding)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from checkpoint import CheckpointConfig, build_checkpointer, dcp, manager
from checkpoint.manager import committed_checkpoints
from optim.config import OptimConfig
from optim.schedules import build_lr_schedule
from tests.distributed import run_distributed
from tests.toy_state import Position

SAVE_AT, STEPS = (2, 4), 4
pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]  # the one-process load


def build(seed: int, world: int | None):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    if world is not None:
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, build_lr_schedule(optimizer, 10, **OptimConfig(warmup_steps=2).schedule_options), Position()


def full_state(model, optimizer) -> dict[str, torch.Tensor]:
    state = dcp.capture_state(model, optimizer)
    flat = {f"model.{k}": v for k, v in state["model"].items()} | {f"optimizer.{k}": v for k, v in state["optimizer"].items()}
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in flat.items() if isinstance(v, torch.Tensor)}


def save_train_resume(root: str, world: int):
    publishes = []
    publish = manager.publish
    manager.publish = lambda *args: (publishes.append(args[2].name), publish(*args))[1]
    settings = CheckpointConfig(mode="lazy", keep_last=2)
    model, optimizer, schedule, data = build(0, world)
    saver = build_checkpointer(root, settings, layout={"world_size": world})
    saver.attach(optimizer)
    g = torch.Generator().manual_seed(dist.get_rank())  # each rank its own batches
    for step in range(1, STEPS + 1):
        model(torch.randn(4, 16, generator=g)).pow(2).mean().backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        data.row = step
        if step in SAVE_AT:
            saver.save(step, model, optimizer, schedule, data)
    saver.finalize()
    saved = full_state(model, optimizer)

    model2, optimizer2, schedule2, data2 = build(1, world)
    resumed_at = build_checkpointer(root, settings).resume(model2, optimizer2, schedule2, data2)
    return publishes, saved, full_state(model2, optimizer2), resumed_at, data2.row


@pytest.mark.parametrize("world", [2, 4])
def test_lazy_checkpoint_commits_once_with_every_shard_and_reloads(tmp_path, world):
    results = run_distributed(save_train_resume, world, str(tmp_path), world)
    for rank, (publishes, saved, resumed, resumed_at, row) in enumerate(results):
        assert publishes == (["step-00000002", "step-00000004"] if rank == 0 else [])  # committed once, by rank 0
        assert resumed_at == STEPS and row == STEPS
        assert saved.keys() == resumed.keys()
        for key in saved:
            torch.testing.assert_close(resumed[key], saved[key], rtol=0, atol=0, msg=key)
    assert [p.name for p in committed_checkpoints(tmp_path)] == ["step-00000002", "step-00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002", "step-00000004"]
    manifest = json.loads((tmp_path / "step-00000004" / "manifest.json").read_text())
    assert manifest["layout"] == {"world_size": world}
    assert {f"__{r}_0.distcp" for r in range(world)} <= manifest["files"].keys()

    one, *_ = build(2, None)
    dcp.load_model(tmp_path / "step-00000004", one)  # resharded: one process, unsharded
    for name, value in one.state_dict().items():
        torch.testing.assert_close(value, results[0][1][f"model.{name}"], rtol=0, atol=0, msg=name)
