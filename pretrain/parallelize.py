"""This process's part of a tp x pp x dp x cp run: process group, device mesh, and the model turned
into what this rank holds and runs.

Order (`parallelize`): tensor parallelism on the whole model, context parallelism (the cp group
that its mixers exchange states, halos and keys over; each batch is then cut with
`Parallel.cut`), this pp rank's pipeline stages, activation checkpointing, FSDP/HSDP on each stage
(or the model; over dp_shard x cp with cp > 1), the pipeline schedule. Build the
optimizer afterwards, on `Parallel.module`, whose parameter names are the single-process model's
(so optimizer state and checkpoints are keyed the same under every layout). The pipeline's loss
function is `pretrain.loss.pipeline_loss_fn`'s: over the last stage's logits, or, with the chunked
or fused linear cross-entropy (`Parallel.head`), which the last stage applies itself, over its
summed loss.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from common.processes import start_process_group
from models.context import Piece, context_parallel
from models.model import HybridLM
from parallel.context_parallel import ContextParallel, apply_context_parallel
from parallel.data_parallel import apply_activation_checkpointing, apply_fsdp
from parallel.mesh import DP_SHARD_CP, build_mesh, validate_layout
from parallel.pipeline import Pipeline, StageModule, build_pipeline_schedule, build_stage_modules
from parallel.tp import apply_tensor_parallel
from pretrain.config import RunConfig
from pretrain.data import Batch
from pretrain.linear_ce import HeadLoss, describe, head_loss, resolve_loss
from pretrain.loss import lm_loss, pipeline_loss_fn
from pretrain.runtime import Runtime


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(device: torch.device, timeout: timedelta) -> None:
    """From torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT); gloo on CPU, and on GPUs
    NCCL with a gloo group beside it for CPU tensors; collectives give up after `timeout`. A no-op
    for one process or when the caller (a test) has already initialised it."""
    if world_size() > 1 and not dist.is_initialized():
        start_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo", timeout)


class RankStages(nn.Module):
    """This pp rank's stage modules as one module named like the model (`embed`, `blocks.<i>`,
    `norm`, `lm_head`), for the optimizer and checkpoints. With tied embeddings the last stage's
    head weight is also this module's `embed.weight`, as the one tied matrix is in the model, so
    the optimizer names, groups and checkpoints it as one process does (parallel/pipeline.py)."""

    def __init__(self, stages: list[StageModule]):
        super().__init__()
        embed = next((s.embed for s in stages if s.embed is not None), None)
        lm_head = next((s.lm_head for s in stages if s.lm_head is not None), None)
        if embed is None and lm_head is not None and stages[0].tie_embeddings:
            embed = tied_embedding_view(lm_head)
        self.embed = embed  # registered first, as in the model: the tied weight's first name is embed.weight
        self.blocks = nn.ModuleDict({name: block for s in stages for name, block in s.blocks.items()})
        self.norm = next((s.norm for s in stages if s.norm is not None), None)
        self.lm_head = lm_head


def tied_embedding_view(head: nn.Linear) -> nn.Embedding:
    """An embedding module whose weight is `head`'s own parameter (after FSDP has replaced it)."""
    embed = nn.Embedding(*head.weight.shape, device="meta")
    embed.weight = head.weight
    return embed


@dataclass
class Parallel:
    """Where this process sits in the layout, and (after `parallelize`) what it holds: `module`
    (the model, or its pipeline stages as `RankStages`) and the `pipeline` when pp > 1."""

    shape: dict[str, int]
    rank: int = 0
    mesh: DeviceMesh | None = None
    module: nn.Module | None = None
    pipeline: Pipeline | None = None
    microbatches: int = 1  # the pipeline's per step
    loss: str = "full"  # the resolved `train.loss` (pretrain.linear_ce.resolve_loss)
    head: HeadLoss | None = None  # the chunked or fused linear cross-entropy; None: logits then `logits_loss`
    logits_loss: Callable[..., Tensor] = lm_loss
    context: ContextParallel | None = None  # with cp > 1: cuts batches into this rank's pieces

    @property
    def world_size(self) -> int:
        return math.prod(self.shape.values())

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks, which read different batches (the cp ranks of one read the same)."""
        return self.shape["dp_replicate"] * self.shape["dp_shard"]

    @property
    def cp(self) -> int:
        return self.shape.get("cp", 1)

    @property
    def dp_rank(self) -> int:
        """The (dp_replicate, dp_shard) coordinate, replica-major."""
        if self.mesh is None:
            return 0
        return self.mesh["dp_replicate"].get_local_rank() * self.shape["dp_shard"] + self.mesh["dp_shard"].get_local_rank()

    def cut(self, batch: Batch) -> tuple[Batch, Piece | None]:
        """This rank's cp piece of a batch that every rank of its cp group holds whole, and the
        `Piece` to make active around its forward and backward (`within`); without context
        parallelism the batch itself and None."""
        if self.context is None:
            return batch, None
        input_ids, labels, cu_seqlens, piece = self.context.cut(batch.input_ids, batch.labels, batch.cu_seqlens)
        return Batch(input_ids, labels, cu_seqlens), piece

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, logs metrics and writes the run directory's files."""
        return self.rank == 0


def start(cfg: RunConfig, runtime: Runtime) -> Parallel:
    """Check the layout (a one-line ParallelError before any rendezvous), then join the process
    group and build the mesh."""
    shape = validate_layout(cfg.parallel, cfg.model, world_size())
    timeout = timedelta(seconds=cfg.parallel.collective_timeout_s)
    init_process_group(runtime.device, timeout)
    if world_size() == 1:
        return Parallel(shape)
    mesh = build_mesh(cfg.parallel, world_size(), runtime.device.type)
    for group in mesh.get_all_groups():  # the mesh makes its groups with torch's default timeout
        group.set_timeout(timeout)
    return Parallel(shape, dist.get_rank(), mesh)


def parallelize(par: Parallel, model: HybridLM, cfg: RunConfig, runtime: Runtime) -> None:
    """Shard `model` into this rank's part (see the module docstring for the order)."""
    p, t = cfg.parallel, cfg.train
    tp, pp = par.shape["tp"], par.shape["pp"]
    if tp > 1:
        # under PP with full logits the schedule's loss takes them whole, so the head gathers them
        apply_tensor_parallel(model, par.mesh["tp"], sequence_parallel=p.sequence_parallel, loss_parallel=pp == 1)
    if par.cp > 1:
        par.context = apply_context_parallel(model, par.mesh["cp"].get_group())
    stages, stage_ids = [model], []
    if pp > 1:
        stages, stage_ids = build_stage_modules(model, par.mesh["pp"].get_local_rank(), pp, p.pp_virtual_stages, t.seq_len)
    for module in stages:
        apply_activation_checkpointing(module, t.activation_checkpoint, t.activation_checkpoint_every)
        if t.compile:
            compile_blocks(module)
        if par.dp_size * par.cp > 1:
            apply_fsdp(module, data_parallel_mesh(par), runtime.dtype == torch.bfloat16, p.fsdp_reshard_after_forward)
    par.module = model
    par.loss, warning = resolve_loss(t.loss, runtime.device, par.shape)
    if warning and par.is_main:
        print(warning, flush=True)
    par.head = head_loss(par.loss, compiled=t.compile and tp == 1)  # vocabulary-parallel, it all-reduces per chunk: eager
    if t.compile and par.loss == "full" and tp == 1:
        par.logits_loss = torch.compile(lm_loss)
    if pp > 1:
        par.microbatches = p.microbatches
        loss_fn = pipeline_loss_fn(par.head)
        par.pipeline = build_pipeline_schedule(
            stages, stage_ids, par.mesh["pp"], p.pp_schedule, p.microbatches, loss_fn, runtime.device, par.head, par.context
        )
        par.module = RankStages(stages)


RECOMPILES_PER_KIND = 4  # a block kind's graph: its first shapes, then dynamic ones, each in train and eval


def compile_blocks(module: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each block in place (torchtitan's per-block compile: one graph reused by every
    block of a kind, parameter names unchanged), the module inside any activation-checkpoint
    wrapper (the checkpoint itself is not traced: a graph break inside it would leave the whole
    block eager), before FSDP wraps it. Ops that cannot be traced (fla's kernels, routing) break
    the graph. Every block shares one forward, which Dynamo compiles once per kind, so its
    recompile limit grows with the kinds (a hybrid of all mixers would otherwise fall back to eager)."""
    blocks = [getattr(block, "_checkpoint_wrapped_module", block) for block in module.blocks.children()]
    kinds = {getattr(block, "kind", type(block)) for block in blocks}
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILES_PER_KIND * len(kinds))
    for block in blocks:
        block.compile(backend=backend)


def fast_path_header(par: Parallel, cfg: RunConfig) -> str:
    """The header's line on the loss and compilation (the ops' line is `models.ops.plan_model`'s)."""
    compiled = "each block and the loss" if par.shape["tp"] == 1 and par.loss != "fused" else "each block"
    return f"ebb: loss {par.loss}: {describe(par.loss)}; torch.compile: {compiled if cfg.train.compile else 'off'}"


def within(piece: Piece | None) -> contextlib.AbstractContextManager:
    """`piece` active around a forward and its backward; nothing to do without cp."""
    return contextlib.nullcontext() if piece is None else context_parallel(piece)


def data_parallel_mesh(par: Parallel) -> DeviceMesh:
    """What FSDP shards over: dp_shard alone, or with cp > 1 the flattened dp_shard x cp (the cp
    ranks' gradients are parts of one sum); with dp_replicate > 1, that dim beside it for HSDP."""
    shard = "dp_shard" if par.cp == 1 else DP_SHARD_CP
    if par.shape["dp_replicate"] == 1:
        return par.mesh[shard]
    return par.mesh["dp_replicate", shard]
