"""Pipeline parallelism: stage cuts in process; PP=2 (1F1B, Interleaved1F1B, ZeroBubble, GPipe)
and PP=4 on gloo against one process doing the same gradient accumulation over the same
microbatches. The tiny models hold every mixer; SSE and the first RWKV-7 block come first, so the
auxiliary loss (SSE, MoM) and RWKV-7's v_first cross stage boundaries in the carry.

Tolerance: float32, losses and final parameters within 2e-5 (the computations per microbatch are
the same; only the order of gradient accumulation and the norm reduction differ)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from models.config import ModelConfig
from models.model import HybridLM
from optim.adamw import build_optimizer
from parallel.data_parallel import apply_fsdp
from parallel.mesh import build_mesh
from parallel.pipeline import (
    balanced_stage_sizes,
    block_costs,
    build_schedule,
    build_stage_modules,
    carry_layout,
    cu_seqlens_of,
    document_starts,
    pipeline_train_step,
    stage_block_ranges,
    stages_of_rank,
)
from pretrain.config import ConfigError, OptimConfig, ParallelConfig, build_config
from pretrain.loss import lm_loss, microbatch_loss, token_scale
from tests.distributed import run_distributed

STEPS, BATCH, SEQ, VOCAB = 3, 4, 16, 64
OPTIM = OptimConfig(lr=3e-3, weight_decay=0.1, fused=False)
GRAD_CLIP = 0.5
TOL = 2e-5


def tiny_config(pattern: str, tie_embeddings: bool = False) -> ModelConfig:
    return ModelConfig(
        pattern=pattern, d_model=32, vocab_size=VOCAB, tie_embeddings=tie_embeddings,
        mixers={
            "attention": {"num_heads": 2},
            "deltanet": {"num_heads": 2, "chunk_size": 8},
            "mamba2": {"head_dim": 16, "d_state": 8, "chunk_size": 8},
            "gated_deltanet": {"num_heads": 2, "head_dim": 8, "chunk_size": 8},
            "sse": {"num_heads": 2, "head_dim": 8, "num_partitions": 2, "chunk_size": 8, "aux_loss_scale": 0.1},
            "rwkv7": {"head_dim": 16, "decay_rank": 8, "a_rank": 8, "v_rank": 8, "gate_rank": 8, "chunk_size": 8},
            "mom": {"num_memories": 2, "topk": 1, "num_heads": 2, "head_dim": 8, "chunk_size": 8, "aux_loss_scale": 0.1},
        },
    )


def packed_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, labels, cu_seqlens) per step, with documents of random lengths across rows."""
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
        starts = torch.randperm(BATCH * SEQ - 1, generator=gen)[:5] + 1
        cu_seqlens = torch.unique(torch.cat([starts, torch.arange(0, BATCH * SEQ + 1, SEQ)])).to(torch.int32)
        batches.append((tokens[:, :-1], tokens[:, 1:], cu_seqlens))
    return batches


def reference_run(cfg: ModelConfig, microbatches: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process: gradient accumulation over the same microbatches, then the same clip and step."""
    torch.manual_seed(0)
    model = HybridLM(cfg)
    optimizer = build_optimizer(model, OPTIM)
    losses = []
    for input_ids, labels, cu_seqlens in packed_batches():
        starts = document_starts(cu_seqlens, BATCH, SEQ)
        step_loss = 0.0
        for ids, lab, st in zip(*(t.chunk(microbatches) for t in (input_ids, labels, starts))):
            carry: dict[str, torch.Tensor] = {}
            loss = lm_loss(model(ids, cu_seqlens=cu_seqlens_of(st), carry=carry), lab) + carry["aux_loss"]
            (loss / microbatches).backward()
            step_loss += loss.item() / microbatches
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def pipeline_rank(cfg: ModelConfig, pp: int, virtual_stages: int, schedule: str, microbatches: int) -> tuple[list[float] | None, dict[str, torch.Tensor]]:
    mesh = init_device_mesh("cpu", (pp,), mesh_dim_names=("pp",))
    torch.manual_seed(0)
    model = HybridLM(cfg)
    modules, stage_ids = build_stage_modules(model, mesh.get_local_rank(), pp, virtual_stages, SEQ)
    pipeline = build_schedule(modules, stage_ids, mesh, schedule, microbatches, microbatch_loss, torch.device("cpu"))
    optimizer = build_optimizer(nn.ModuleList(modules), OPTIM)
    shape = dict(pp=pp, dp_replicate=1, dp_shard=1, tp=1)
    losses = []
    for input_ids, labels, cu_seqlens in packed_batches():
        scale = token_scale(labels, shape, microbatches)
        loss, _ = pipeline_train_step(pipeline, optimizer, input_ids, labels, cu_seqlens, GRAD_CLIP, {"scale": scale})
        losses.append(None if loss is None else loss.item())
    params = {name: p.detach().clone() for module in modules for name, p in module.named_parameters()}
    return (losses if pipeline.has_last else None), params


@pytest.mark.parametrize(
    "pattern, pp, virtual_stages, schedule",
    [
        ("SRM*TGRO", 2, 1, "1f1b"),
        ("SR | M* | TG | RO", 2, 2, "interleaved_1f1b"),
        ("SR | M* | TG | RO", 2, 2, "zero_bubble"),
        ("SRM*TGRO", 2, 1, "gpipe"),
        ("SR | M* | TG | RO", 4, 1, "1f1b"),
    ],
    ids=["pp2-1f1b", "pp2-interleaved", "pp2-zero-bubble", "pp2-gpipe", "pp4-1f1b"],
)
def test_pipeline_matches_one_process(pattern: str, pp: int, virtual_stages: int, schedule: str) -> None:
    cfg = tiny_config(pattern)
    microbatches = BATCH
    ref_losses, ref_params = reference_run(cfg, microbatches)
    results = run_distributed(pipeline_rank, pp, cfg, pp, virtual_stages, schedule, microbatches)
    losses = [r[0] for r in results if r[0] is not None]
    assert len(losses) == 1
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(ref_losses), rtol=0, atol=TOL)
    seen = set()
    for _, params in results:
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name], rtol=0, atol=TOL, msg=name)
            seen.add(name)
    assert seen == set(ref_params)


def test_pattern_cuts_give_stages() -> None:
    model = HybridLM(tiny_config("M* | T | G*"))
    assert stage_block_ranges(model, 3, SEQ) == [range(0, 2), range(2, 3), range(3, 5)]
    with pytest.raises(ValueError, match="need 2 non-empty stages"):
        stage_block_ranges(model, 2, SEQ)


def test_automatic_balance() -> None:
    assert balanced_stage_sizes([1, 1, 1, 1], 2) == [2, 2]
    assert balanced_stage_sizes([4, 1, 1, 1, 1], 2) == [1, 4]
    assert balanced_stage_sizes([1, 1, 1, 1, 1, 5], 3) == [2, 3, 1]
    model = HybridLM(tiny_config("MMMM"))
    costs = block_costs(model, SEQ)
    assert costs[-1] > costs[0]  # the head rides with the last block
    sizes = [len(r) for r in stage_block_ranges(model, 2, SEQ)]
    assert sum(sizes) == 4 and max(sum(costs[:sizes[0]]), sum(costs[sizes[0]:])) == min(
        max(sum(costs[:k]), sum(costs[k:])) for k in range(1, 4)
    )


def test_placement_carry_layout_and_document_starts() -> None:
    assert stages_of_rank(1, 2, 2) == [1, 3]
    model = HybridLM(tiny_config("M* S R T R"))
    assert carry_layout(model.blocks[:2]) == ()
    assert carry_layout(model.blocks) == ("aux_loss", "v_first")
    cu_seqlens = torch.tensor([0, 3, 8, 11, 16], dtype=torch.int32)
    starts = document_starts(cu_seqlens, 2, 8)
    assert torch.equal(cu_seqlens_of(starts), cu_seqlens)
    assert torch.equal(cu_seqlens_of(starts[1:]), torch.tensor([0, 3, 8], dtype=torch.int32))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.pp_schedule=foo"], "parallel.pp_schedule: Input should be 'gpipe', '1f1b', 'interleaved_1f1b' or 'zero_bubble'"),
        (["parallel.pp_schedule=interleaved_1f1b"], "needs pp_virtual_stages >= 2"),
        (["parallel.pp_virtual_stages=2"], "runs one stage per rank"),
        (["parallel.pp=2", "parallel.pp_microbatches=3", "train.batch_size=8"], r"pp_microbatches \(3\) must divide train.batch_size \(8\)"),
        (["parallel.pp=2", "model.pattern=M|*|T"], "3 '|'-separated stages but pp \\* pp_virtual_stages is 2"),
        (["parallel.pp=8", "model.pattern=MTG*"], "need at least as many blocks"),
        (["parallel.pp=2"], "set model.tie_embeddings=false"),
    ],
)
def test_pipeline_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_config({}, overrides)
    assert "\n" not in str(info.value)


def pipeline_fsdp_rank(cfg: ModelConfig, microbatches: int) -> tuple[list[float] | None, dict[str, torch.Tensor]]:
    """pp=2 x dp_shard=2 on build_mesh: each dp rank pipelines its half of the global batch."""
    mesh = build_mesh(ParallelConfig(pp=2, dp_shard=2), 4, "cpu")
    torch.manual_seed(0)
    model = HybridLM(cfg)
    modules, stage_ids = build_stage_modules(model, mesh["pp"].get_local_rank(), 2, 1, SEQ)
    for module in modules:
        apply_fsdp(module, mesh["dp_shard"], mixed_precision=False)
    pipeline = build_schedule(modules, stage_ids, mesh["pp"], "1f1b", microbatches, microbatch_loss, torch.device("cpu"))
    optimizer = build_optimizer(nn.ModuleList(modules), OPTIM)
    dp_rank, rows = mesh["dp_shard"].get_local_rank(), BATCH // 2
    mine = slice(dp_rank * rows, (dp_rank + 1) * rows)
    losses = []
    for input_ids, labels, cu_seqlens in packed_batches():
        starts = document_starts(cu_seqlens, BATCH, SEQ)[mine]
        scale = token_scale(labels[mine], dict(pp=2, dp_replicate=1, dp_shard=2, tp=1), microbatches)
        loss, _ = pipeline_train_step(pipeline, optimizer, input_ids[mine], labels[mine], cu_seqlens_of(starts), GRAD_CLIP, {"scale": scale})
        if loss is not None:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=mesh["dp_shard"].get_group())
            losses.append(loss.item())
    params = {name: value.full_tensor() for module in modules for name, value in module.state_dict().items()}
    return (losses if pipeline.has_last else None), params


def test_pipeline_with_fsdp_matches_one_process() -> None:
    """Each dp rank's 2 microbatches are 2 of the one process's 4 (contiguous rows)."""
    cfg = tiny_config("SRM* | TGRO")
    ref_losses, ref_params = reference_run(cfg, 4)
    results = run_distributed(pipeline_fsdp_rank, 4, cfg, 2)
    for losses, params in results:
        if losses is not None:
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=TOL)
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name], rtol=0, atol=TOL, msg=name)
    assert sum(r[0] is not None for r in results) == 2
    assert set().union(*(r[1] for r in results)) == set(ref_params)
