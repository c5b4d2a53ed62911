"""FSDP2 (dp_shard=2) and HSDP (2 x 2) on gloo against one process that sees the whole global
batch, both trained by the production step (tests/parity.py); activation checkpointing in process
and under FSDP.

The one process accumulates over as many row groups of the global batch as there are ranks: for
the language-model loss that is the whole batch's mean (normalised by the global token count), and
it is what data parallelism means for SSE's auxiliary loss, a batch statistic that each rank
computes on its own rows. Tolerance: float32, losses and final parameters within 2e-5."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from models.config import ModelConfig
from models.model import HybridLM
from parallel.data_parallel import apply_activation_checkpointing, apply_fsdp
from pretrain.config import load_config
from pretrain.parallelize import Parallel
from pretrain.train import train
from tests.conftest import every_mixer, tiny_model_config, tiny_model_overrides
from tests.distributed import run_distributed
from tests.parity import SEQ, layout, one_process, packed_batches, row_groups, total_losses, train_steps
from tests.runs import records

PATTERN = every_mixer(2)
TOL = 2e-5
AUX_LOSSES = {"sse": {"aux_loss_scale": 0.1}, "mom": {"aux_loss_scale": 0.1}}  # large enough to matter


def fsdp_config(tie_embeddings: bool = True) -> ModelConfig:
    return tiny_model_config(PATTERN, tie_embeddings=tie_embeddings, mixers=AUX_LOSSES)


def reference_run(cfg: ModelConfig, groups: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    return one_process(cfg, [row_groups(batch, groups) for batch in packed_batches()])


def fsdp_rank(cfg: ModelConfig, mesh_shape: tuple[int, ...], checkpointing: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Rank r trains on row group r of each global batch."""
    names = ("dp_replicate", "dp_shard")[-len(mesh_shape):]
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = HybridLM(cfg)
    apply_activation_checkpointing(model, checkpointing, every=2)
    apply_fsdp(model, mesh, mixed_precision=False)
    first = next(model.parameters())
    assert isinstance(first, DTensor) and first.placements[-1] == Shard(0)
    steps = [[row_groups(batch, dist.get_world_size())[dist.get_rank()]] for batch in packed_batches()]
    losses = total_losses(train_steps(Parallel(layout(**dict(zip(names, mesh_shape))), module=model), steps))
    return losses, {name: value.full_tensor() for name, value in model.state_dict().items()}


@pytest.mark.distributed
@pytest.mark.parametrize(
    "mesh_shape, checkpointing", [((2,), "full"), ((2, 2), "selective")], ids=["fsdp2-full-ac", "hsdp2x2-selective-ac"]
)
def test_fsdp_matches_one_process(mesh_shape: tuple[int, ...], checkpointing: str) -> None:
    cfg = fsdp_config()
    world = math.prod(mesh_shape)
    ref_losses, ref_params = reference_run(cfg, world)
    results = run_distributed(fsdp_rank, world, cfg, mesh_shape, checkpointing)
    for losses, params in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=TOL)
        assert params.keys() == ref_params.keys()
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name], rtol=0, atol=TOL, msg=name)


@pytest.mark.parametrize("mode, every_kth", [("none", None), ("full", 1), ("selective", 2)])
def test_activation_checkpointing_wraps_blocks_and_keeps_numerics(mode: str, every_kth: int | None) -> None:
    cfg = fsdp_config(tie_embeddings=False)
    wrapped = [] if every_kth is None else list(range(every_kth - 1, cfg.n_layers, every_kth))
    torch.manual_seed(0)
    plain = HybridLM(cfg)
    torch.manual_seed(0)
    model = HybridLM(cfg)
    apply_activation_checkpointing(model, mode, every=2)
    assert [i for i, b in enumerate(model.blocks) if isinstance(b, CheckpointWrapper)] == wrapped
    assert model.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(2))
    for m in (plain, model):
        carry: dict[str, torch.Tensor] = {}
        (m(ids, carry=carry).square().mean() + carry["aux_loss"]).backward()
    for (name, p), q in zip(plain.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=name)


def mixed_precision_rank(cfg: ModelConfig) -> tuple[torch.dtype, torch.dtype, bool]:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
    model = HybridLM(cfg)
    apply_fsdp(model, mesh, mixed_precision=True, reshard_after_forward=False)
    carry: dict[str, torch.Tensor] = {}
    logits = model(torch.randint(0, cfg.vocab_size, (1, SEQ)), carry=carry)
    (logits.float().square().mean() + carry["aux_loss"]).backward()
    grad = next(model.parameters()).grad
    return logits.dtype, grad.dtype, "aux_loss" in carry


@pytest.mark.distributed
def test_fsdp_mixed_precision_computes_in_bf16_and_keeps_the_carry() -> None:
    results = run_distributed(mixed_precision_rank, 2, fsdp_config())
    assert results == [(torch.bfloat16, torch.float32, True)] * 2


TINY_RUN = [
    *tiny_model_overrides(PATTERN, vocab_size=320),
    "data.embedded_max_bytes=50000", "train.threads=1", "train.steps=3", "train.seq_len=16", "train.batch_size=2",
    "train.eval_interval=0", "train.dtype=float32", "train.device=cpu", "optim.warmup_steps=1", "logging.progress=false",
    "logging.tensorboard=false",
]


def train_run(run_dir, *extra: str, resume: bool = False) -> list[float]:
    train(load_config(None, [*TINY_RUN, f"train.run_dir={run_dir}", *extra]), resume)
    return [r["loss"] for r in records(run_dir) if "loss" in r]


@pytest.mark.slow
def test_train_loop_with_activation_checkpointing_matches_and_resumes(tmp_path) -> None:
    """train.activation_checkpoint changes no loss, and a checkpoint saved without it resumes with it."""
    plain = train_run(tmp_path / "plain")
    assert train_run(tmp_path / "full", "train.activation_checkpoint=full") == pytest.approx(plain, abs=1e-6)
    train_run(tmp_path / "resumed", "train.stop_at_step=2")
    resumed = train_run(tmp_path / "resumed", "train.activation_checkpoint=selective", resume=True)
    assert resumed[-1] == pytest.approx(plain[-1], abs=1e-6)
