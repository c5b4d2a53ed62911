"""A DCP checkpoint of a model with Mamba2 (n_groups = 2) moves between tp = 1 and tp = 2 (real
processes on gloo): the stored in_proj / conv1d row order is group-major at every tp.

Saved at tp = 1, loaded at tp = 2 (trained one step further there), saved again and loaded in
one process: after each load the logits equal those of the saved model (atol/rtol 1e-5, the same
weights with the sums over heads split) and in_proj's weight and AdamW moments are identical."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from models.model import HybridLM
from optim.adamw import build_optimizer
from optim.config import OptimConfig
from parallel.tp import apply_tensor_parallel
from tests.conftest import TP2_MIXERS, tiny_model_config
from tests.distributed import run_distributed

TP, BATCH, SEQ, VOCAB, TOL = 2, 2, 16, 64, 1e-5
CONFIG = tiny_model_config("M*", vocab_size=VOCAB, mlp_hidden=64, mixers=TP2_MIXERS)
OPTIM = OptimConfig(lr=3e-3, weight_decay=0.1, fused=False)
IN_PROJ = "blocks.0.mixer.in_proj.weight"
pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]  # the one-process save/load

Snapshot = dict[str, Tensor]  # logits on a probe batch, in_proj's weight and AdamW moments


def build(seed: int, tp_mesh=None) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = HybridLM(CONFIG)
    if tp_mesh is not None:
        apply_tensor_parallel(model, tp_mesh, loss_parallel=False)
    return model, build_optimizer(model, OPTIM)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()


def full(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> Snapshot:
    probe = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits = model(probe)
    weight = dict(model.named_parameters())[IN_PROJ]
    moments = {k: full(v) for k, v in optimizer.state[weight].items() if k != "step"}
    return {"logits": logits, "weight": full(weight).detach(), **moments}


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=path, no_dist=not dist.is_initialized())


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def assert_same(got: Snapshot, want: Snapshot) -> None:
    torch.testing.assert_close(got["logits"], want["logits"], atol=TOL, rtol=TOL)
    for name in ("weight", "exp_avg", "exp_avg_sq"):
        assert torch.equal(got[name], want[name]), name


def tp2_rank(saved_at_tp1: Path, save_to: Path) -> tuple[Snapshot, Snapshot]:
    """Load the tp=1 checkpoint into a differently initialised tp=2 model, then train a step and
    save it: the snapshots after loading and after the step."""
    mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    model, optimizer = build(seed=1, tp_mesh=mesh)
    load(saved_at_tp1, model, optimizer)
    loaded = snapshot(model, optimizer)
    train_steps(model, optimizer, 1, seed=3)
    save(save_to, model, optimizer)
    return loaded, snapshot(model, optimizer)


def test_mamba2_checkpoint_moves_between_tp1_and_tp2(tmp_path: Path) -> None:
    model, optimizer = build(seed=0)
    train_steps(model, optimizer, 2, seed=2)
    save(tmp_path / "tp1", model, optimizer)
    saved = snapshot(model, optimizer)

    for loaded, trained in run_distributed(tp2_rank, TP, tmp_path / "tp1", tmp_path / "tp2"):
        assert_same(loaded, saved)

    model, optimizer = build(seed=2)
    load(tmp_path / "tp2", model, optimizer)
    assert_same(snapshot(model, optimizer), trained)
