"""FSDP2 (dp_shard=2) and HSDP (2 x 2) on gloo against one process that sees the whole global
batch; activation checkpointing in process and under FSDP.

The one process cuts the global batch into as many row groups as there are ranks and averages
their losses: for the language-model loss that is the whole batch's mean (equal token counts),
and it is what data parallelism means for SSE's auxiliary loss, a batch statistic that each rank
computes on its own rows. Tolerance: float32, losses and final parameters within 2e-5."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from models.config import ModelConfig
from models.model import HybridLM
from optim.adamw import build_optimizer
from parallel.data_parallel import apply_activation_checkpointing, apply_fsdp
from parallel.pipeline import cu_seqlens_of, document_starts
from pretrain.config import load_config
from pretrain.loss import lm_loss
from pretrain.train import train
from tests.distributed import run_distributed
from tests.parallel.test_pipeline import BATCH, GRAD_CLIP, OPTIM, SEQ, TOL, packed_batches, tiny_config

PATTERN = "SRM*TGRO"


def train_losses(model: nn.Module, groups: int, rank: int | None = None) -> list[torch.Tensor]:
    """Three steps of AdamW with clipping; each global batch's rows are cut into `groups` equal
    groups, and the loss is the mean of the groups' losses: over every group (`rank` None, one
    process) or over this rank's group (with gradients averaged across ranks by FSDP)."""
    optimizer = build_optimizer(model, OPTIM)
    losses = []
    for input_ids, labels, cu_seqlens in packed_batches():
        starts = document_starts(cu_seqlens, BATCH, SEQ)
        mine = range(groups) if rank is None else [rank]
        step_loss = 0.0
        for g in mine:
            rows = slice(g * BATCH // groups, (g + 1) * BATCH // groups)
            carry: dict[str, torch.Tensor] = {}
            loss = lm_loss(model(input_ids[rows], cu_seqlens=cu_seqlens_of(starts[rows]), carry=carry), labels[rows]) + carry["aux_loss"]
            (loss / len(mine)).backward()
            step_loss += loss.detach() / len(mine)
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    return losses


def reference_run(cfg: ModelConfig, groups: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = HybridLM(cfg)
    losses = [loss.item() for loss in train_losses(model, groups)]
    return losses, {name: value.clone() for name, value in model.state_dict().items()}


def fsdp_rank(cfg: ModelConfig, mesh_shape: tuple[int, ...], checkpointing: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    names = ("dp_replicate", "dp_shard")[-len(mesh_shape):]
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = HybridLM(cfg)
    apply_activation_checkpointing(model, checkpointing, every=2)
    apply_fsdp(model, mesh, mixed_precision=False)
    first = next(model.parameters())
    assert isinstance(first, DTensor) and first.placements[-1] == Shard(0)
    losses = torch.stack(train_losses(model, dist.get_world_size(), dist.get_rank()))
    dist.all_reduce(losses, op=dist.ReduceOp.AVG)
    return losses.tolist(), {name: value.full_tensor() for name, value in model.state_dict().items()}


@pytest.mark.parametrize(
    "mesh_shape, checkpointing", [((2,), "full"), ((2, 2), "selective")], ids=["fsdp2-full-ac", "hsdp2x2-selective-ac"]
)
def test_fsdp_matches_one_process(mesh_shape: tuple[int, ...], checkpointing: str) -> None:
    cfg = tiny_config(PATTERN, tie_embeddings=True)
    world = math.prod(mesh_shape)
    ref_losses, ref_params = reference_run(cfg, world)
    results = run_distributed(fsdp_rank, world, cfg, mesh_shape, checkpointing)
    for losses, params in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=TOL)
        assert params.keys() == ref_params.keys()
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name], rtol=0, atol=TOL, msg=name)


@pytest.mark.parametrize("mode, wrapped", [("none", []), ("full", list(range(8))), ("selective", [1, 3, 5, 7])])
def test_activation_checkpointing_wraps_blocks_and_keeps_numerics(mode: str, wrapped: list[int]) -> None:
    cfg = tiny_config(PATTERN)
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


def test_fsdp_mixed_precision_computes_in_bf16_and_keeps_the_carry() -> None:
    results = run_distributed(mixed_precision_rank, 2, tiny_config(PATTERN, tie_embeddings=True))
    assert results == [(torch.bfloat16, torch.float32, True)] * 2


TINY_RUN = [
    "model.pattern=SRM*TGRO", "model.d_model=32", "model.vocab_size=320",
    "model.mixers.attention.num_heads=2", "model.mixers.deltanet.num_heads=2",
    "model.mixers.mamba2.head_dim=16", "model.mixers.mamba2.d_state=8", "model.mixers.mamba2.chunk_size=8",
    "model.mixers.gated_deltanet.num_heads=2", "model.mixers.gated_deltanet.head_dim=8",
    "model.mixers.sse.num_heads=2", "model.mixers.sse.head_dim=8", "model.mixers.sse.num_partitions=2",
    "model.mixers.rwkv7.head_dim=16", "model.mixers.rwkv7.decay_rank=8", "model.mixers.rwkv7.a_rank=8",
    "model.mixers.rwkv7.v_rank=8", "model.mixers.rwkv7.gate_rank=8",
    "model.mixers.mom.num_memories=2", "model.mixers.mom.topk=1", "model.mixers.mom.num_heads=2", "model.mixers.mom.head_dim=8",
    "data.embedded_max_bytes=50000", "train.threads=1", "train.steps=3", "train.seq_len=16", "train.batch_size=2",
    "train.eval_interval=0", "train.dtype=float32", "train.device=cpu", "optim.warmup_steps=1", "logging.progress=false",
    "logging.tensorboard=false",
]


def train_run(run_dir, *extra: str, resume: bool = False) -> list[float]:
    train(load_config(None, [*TINY_RUN, f"train.run_dir={run_dir}", *extra]), resume)
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]


def test_train_loop_with_activation_checkpointing_matches_and_resumes(tmp_path) -> None:
    """train.activation_checkpoint changes no loss, and a checkpoint saved without it resumes with it."""
    plain = train_run(tmp_path / "plain")
    assert train_run(tmp_path / "full", "train.activation_checkpoint=full") == pytest.approx(plain, abs=1e-6)
    train_run(tmp_path / "resumed", "train.stop_at_step=2")
    resumed = train_run(tmp_path / "resumed", "train.activation_checkpoint=selective", resume=True)
    assert resumed[-1] == pytest.approx(plain[-1], abs=1e-6)
