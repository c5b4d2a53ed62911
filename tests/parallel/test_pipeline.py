"""Pipeline parallelism: stage cuts in process; PP=2 (1F1B, Interleaved1F1B, ZeroBubble, GPipe)
and PP=4 on gloo against one process accumulating gradients over the same microbatches, both
trained by the production step (tests/parity.py), the last stage computing the loss from its
logits or applying the chunked linear cross-entropy itself. The tiny models hold every mixer; SSE and the
first RWKV-7 block come first, so the auxiliary loss (SSE, MoM) and RWKV-7's v_first cross stage
boundaries in the carry.

Tolerance: float32, losses and final parameters within 2e-5 (the computations per microbatch are
the same; only the order of gradient accumulation and the norm reduction differ)."""
from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from models.config import ModelConfig
from models.model import HybridLM
from models.packing import cu_seqlens_from_mask, document_start_mask
from parallel.config import ParallelConfig
from parallel.data_parallel import apply_fsdp
from parallel.mesh import build_mesh
from parallel.pipeline import (
    balanced_stage_sizes,
    block_costs,
    build_pipeline_schedule,
    build_stage_modules,
    carry_layout,
    stage_block_ranges,
    stages_of_rank,
)
from pretrain.config import ConfigError, build_config
from pretrain.linear_ce import head_loss
from pretrain.loss import pipeline_loss_fn
from pretrain.parallelize import Parallel, RankStages
from tests.conftest import every_mixer, tiny_model_config
from tests.distributed import run_distributed
from tests.parity import BATCH, CPU, SEQ, full, layout, one_process, packed_batches, row_groups, total_losses, train_steps

TOL = 2e-5
AUX_LOSSES = {"sse": {"aux_loss_scale": 0.1}, "mom": {"aux_loss_scale": 0.1}}  # large enough to matter


def pipeline_config(pattern: str, tie_embeddings: bool = False) -> ModelConfig:
    return tiny_model_config(pattern, tie_embeddings=tie_embeddings, mixers=AUX_LOSSES)


def reference_run(cfg: ModelConfig, microbatches: int, loss: str = "full") -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process accumulating over each batch's `microbatches` row groups, with the same loss."""
    return one_process(cfg, [row_groups(batch, microbatches) for batch in packed_batches()], loss)


def pipelined(par: Parallel, dp_rank: int = 0) -> tuple[list[float] | None, dict[str, torch.Tensor]]:
    """Train this rank's stages on dp rank `dp_rank`'s rows of every batch; the losses (on the
    ranks holding the last stage, else None) and the stages' parameters, gathered."""
    steps = [[row_groups(batch, par.dp_size)[dp_rank]] for batch in packed_batches()]
    losses = total_losses(train_steps(par, steps))
    params = {name: full(value) for name, value in par.module.state_dict().items()}
    return (losses if par.pipeline.has_last else None), params


def schedule_loss(loss: str) -> dict:
    """build_pipeline_schedule's loss arguments for `train.loss` full or chunked, as parallelize gives them."""
    head = head_loss(loss)
    return {"loss_fn": pipeline_loss_fn(head), "head": head}


def pipeline_rank(
    cfg: ModelConfig, pp: int, virtual_stages: int, schedule: str, microbatches: int, loss: str = "full",
) -> tuple[list[float] | None, dict[str, torch.Tensor]]:
    mesh = init_device_mesh("cpu", (pp,), mesh_dim_names=("pp",))
    torch.manual_seed(0)
    model = HybridLM(cfg)
    modules, stage_ids = build_stage_modules(model, mesh.get_local_rank(), pp, virtual_stages, SEQ)
    pipeline = build_pipeline_schedule(modules, stage_ids, mesh, schedule, microbatches, device=CPU.device, **schedule_loss(loss))
    head_calls = []
    model.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    result = pipelined(Parallel(layout(pp=pp), module=RankStages(modules), pipeline=pipeline, microbatches=microbatches))
    assert bool(head_calls) == (pipeline.has_last and loss == "full")  # a head loss never makes the logits
    return result


@pytest.mark.distributed
@pytest.mark.parametrize(
    "pattern, pp, virtual_stages, schedule, loss",
    [
        (every_mixer(2), 2, 1, "1f1b", "full"),
        (every_mixer(2), 2, 1, "1f1b", "chunked"),
        (every_mixer(2, stages=4), 2, 2, "interleaved_1f1b", "full"),
        ("SR | M* | TG | RO", 2, 2, "zero_bubble", "full"),
        ("SR | M* | TG | RO", 2, 2, "zero_bubble", "chunked"),  # the head's weight gradient in the weight step
        # RWKV-7's first block on a later stage: its v_first (a view) leaves that stage, whose
        # input-gradient step then detaches it in place
        ("SM | R* | TG | RO", 2, 2, "zero_bubble", "full"),
        (every_mixer(2), 2, 1, "gpipe", "full"),
        (every_mixer(2, stages=4), 4, 1, "1f1b", "chunked"),
    ],
    ids=["pp2-1f1b", "pp2-1f1b-chunked-loss", "pp2-interleaved", "pp2-zero-bubble", "pp2-zero-bubble-chunked-loss",
         "pp2-zero-bubble-later-rwkv7", "pp2-gpipe", "pp4-1f1b-chunked-loss"],
)
def test_pipeline_matches_one_process(pattern: str, pp: int, virtual_stages: int, schedule: str, loss: str) -> None:
    cfg = pipeline_config(pattern)
    microbatches = BATCH
    ref_losses, ref_params = reference_run(cfg, microbatches, loss)
    results = run_distributed(pipeline_rank, pp, cfg, pp, virtual_stages, schedule, microbatches, loss)
    losses = [r[0] for r in results if r[0] is not None]
    assert len(losses) == 1
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(ref_losses), rtol=0, atol=TOL)
    seen = set()
    for _, params in results:
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name], rtol=0, atol=TOL, msg=lambda m: f"{name}: {m}")
            seen.add(name)
    assert seen == set(ref_params)


def test_pattern_cuts_give_stages() -> None:
    model = HybridLM(pipeline_config("M* | T | G*"))
    assert stage_block_ranges(model, 3, SEQ) == [range(0, 2), range(2, 3), range(3, 5)]
    with pytest.raises(ValueError, match="need 2 non-empty stages"):
        stage_block_ranges(model, 2, SEQ)


def test_automatic_balance() -> None:
    assert balanced_stage_sizes([1, 1, 1, 1], 2) == [2, 2]
    assert balanced_stage_sizes([4, 1, 1, 1, 1], 2) == [1, 4]
    assert balanced_stage_sizes([1, 1, 1, 1, 1, 5], 3) == [2, 3, 1]
    model = HybridLM(pipeline_config("MMMM"))
    costs = block_costs(model, SEQ)
    assert costs[-1] > costs[0]  # the head rides with the last block
    sizes = [len(r) for r in stage_block_ranges(model, 2, SEQ)]
    assert sum(sizes) == 4 and max(sum(costs[:sizes[0]]), sum(costs[sizes[0]:])) == min(
        max(sum(costs[:k]), sum(costs[k:])) for k in range(1, 4)
    )


def test_placement_carry_layout_and_document_start_mask() -> None:
    assert stages_of_rank(1, 2, 2) == [1, 3]
    model = HybridLM(pipeline_config("M* S R T R"))
    assert carry_layout(model.blocks[:2]) == ()
    assert carry_layout(model.blocks) == ("aux_loss", "v_first")
    cu_seqlens = torch.tensor([0, 3, 8, 11, 16], dtype=torch.int32)
    starts = document_start_mask(cu_seqlens, 2, 8)
    assert torch.equal(cu_seqlens_from_mask(starts), cu_seqlens)
    assert torch.equal(cu_seqlens_from_mask(starts[1:]), torch.tensor([0, 3, 8], dtype=torch.int32))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.pp_schedule=foo"], r"parallel.pp_schedule: unknown pipeline schedule 'foo' \(one of gpipe, 1f1b, interleaved_1f1b, zero_bubble\)"),
        (["parallel.pp_schedule=interleaved_1f1b"], "needs pp_virtual_stages >= 2"),
        (["parallel.pp_virtual_stages=2"], "runs one stage per rank"),
        (["parallel.pp=2", "parallel.pp_microbatches=3", "train.batch_size=8"], r"pp_microbatches \(3\) must divide train.batch_size \(8\)"),
        (["parallel.pp=2", "model.pattern=M|*|T"], "3 '|'-separated stages but pp \\* pp_virtual_stages is 2"),
        (["parallel.pp=8", "model.pattern=MTG*"], "need at least as many blocks"),
    ],
)
def test_pipeline_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_config({}, overrides)
    assert "\n" not in str(info.value)


@pytest.mark.distributed
def test_tied_embeddings_under_pp2_match_one_process() -> None:
    """The embedding on the first stage and the head on the last are two copies of one tied
    matrix: their gradients are summed between the two ranks, so losses and both copies follow
    the one-process model, whose tied weight is both."""
    cfg = pipeline_config(every_mixer(2), tie_embeddings=True)
    ref_losses, ref_params = reference_run(cfg, BATCH)
    results = run_distributed(pipeline_rank, 2, cfg, 2, 1, "1f1b", BATCH)
    torch.testing.assert_close(torch.tensor(results[1][0]), torch.tensor(ref_losses), rtol=0, atol=TOL)
    first, last = results[0][1], results[1][1]
    assert "lm_head.weight" not in first and {"embed.weight", "lm_head.weight"} <= last.keys()  # the head's copy is also named embed.weight
    for copy in (first["embed.weight"], last["embed.weight"], last["lm_head.weight"]):
        torch.testing.assert_close(copy, ref_params["embed.weight"], rtol=0, atol=TOL)


def pipeline_fsdp_rank(cfg: ModelConfig, microbatches: int, loss: str) -> tuple[list[float] | None, dict[str, torch.Tensor]]:
    """pp=2 x dp_shard=2 on build_mesh: each dp rank pipelines its half of the global batch."""
    mesh = build_mesh(ParallelConfig(pp=2, dp_shard=2), 4, "cpu")
    torch.manual_seed(0)
    model = HybridLM(cfg)
    modules, stage_ids = build_stage_modules(model, mesh["pp"].get_local_rank(), 2, 1, SEQ)
    for module in modules:
        apply_fsdp(module, mesh["dp_shard"], mixed_precision=False)
    pipeline = build_pipeline_schedule(modules, stage_ids, mesh["pp"], "1f1b", microbatches, device=CPU.device, **schedule_loss(loss))
    par = Parallel(layout(pp=2, dp_shard=2), module=RankStages(modules), pipeline=pipeline, microbatches=microbatches)
    return pipelined(par, mesh["dp_shard"].get_local_rank())


@pytest.mark.distributed
@pytest.mark.parametrize("tie_embeddings, loss", [(False, "full"), (True, "full"), (True, "chunked")], ids=["untied", "tied", "tied-chunked-loss"])
def test_pipeline_with_fsdp_matches_one_process(tie_embeddings: bool, loss: str) -> None:
    """Each dp rank's 2 microbatches are 2 of the one process's 4 (contiguous rows); tied, each
    dp rank's shard of the embedding and of the head's copy are summed between its two stages.
    With the chunked loss the last stage applies it inside its forward, where FSDP has gathered
    the head's weight."""
    cfg = pipeline_config("SRM* | TGRO", tie_embeddings)
    ref_losses, ref_params = reference_run(cfg, 4, loss)
    results = run_distributed(pipeline_fsdp_rank, 4, cfg, 2, loss)
    for losses, params in results:
        if losses is not None:
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=TOL)
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name], rtol=0, atol=TOL, msg=lambda m: f"{name}: {m}")
    assert sum(r[0] is not None for r in results) == 2
    assert set().union(*(r[1] for r in results)) == set(ref_params)
