"""`python -m pretrain.train --config X --dry-run`: what a run would be, without building it.

Checks what a real run checks before its first step (the config, the layout for the world size,
the run and checkpoint directories, room for a checkpoint; data is not read) and prints the
layout (mesh, stages and their blocks), parameter counts per mixer kind, and a memory estimate
per rank from `pretrain.estimate`, all on the meta device.

The estimate of a rank: its parameters and gradients (float32), its optimizer states by codec,
and the activations of its micro-batch. One process is measured as it runs. Under a layout the
rank's share is counted: its pipeline stages' parameters (and, tied, the head's copy of the
embedding on the last stage), divided over `tp x dp_shard x cp` (TP splits almost every matrix,
FSDP shards what each rank keeps over dp_shard x cp); activations measured on the rank's cp piece
(seq_len / cp tokens of every sequence), scaled to its stages' share of the blocks, the
micro-batches a schedule keeps in flight (all of them for GPipe, up to `pp` for the others) and
divided by `tp` (approximate: the residual stream is replicated unless sequence parallel).
"""
from __future__ import annotations

import torch

from models.mixers import PATTERN
from models.model import HybridLM
from parallel.mesh import MESH_DIMS, validate_layout
from parallel.pipeline import build_stage_modules
from pretrain.config import RunConfig
from pretrain.estimate import FP32, MemoryEstimate, activation_bytes, meta_model, param_counts, state_bytes
from pretrain.linear_ce import resolve_loss
from pretrain.parallelize import RankStages
from pretrain.preflight import check_directories

MiB = 1 << 20


def describe_run(cfg: RunConfig, world_size: int) -> str:
    """The dry run's report; raises the one-line errors a real run would raise before its first step."""
    shape = validate_layout(cfg.parallel, cfg.model, world_size)
    check_directories(cfg, look_only=True)
    model = meta_model(cfg.model)
    device, dtype = assumed_device(cfg)
    lines = [f"ebb dry run: {cfg.model.pattern!r}, world size {world_size}, device {device} ({str(dtype).removeprefix('torch.')}), nothing built"]
    lines += layout_lines(cfg, model, shape)
    lines += parameter_lines(model)
    lines += memory_lines(cfg, shape, dtype)
    return "\n".join(lines)


def assumed_device(cfg: RunConfig) -> tuple[str, torch.dtype]:
    """The device and compute dtype the run would pick (`pretrain.runtime`), assuming a GPU that
    supports bf16 when it would use CUDA."""
    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cfg.train.dtype != "auto":
        return ("cuda" if cuda else "cpu"), getattr(torch, cfg.train.dtype)
    return ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)


def layout_lines(cfg: RunConfig, model: HybridLM, shape: dict[str, int]) -> list[str]:
    mesh = " x ".join(f"{dim} {size}" for dim, size in shape.items())
    lines = [f"layout: {mesh} (mesh dims {', '.join(MESH_DIMS)})"]
    for pp_rank in range(shape["pp"]):
        for stage, ids in stage_blocks(cfg, model, shape, pp_rank):
            ends = (["embedding"] if stage == 0 else []) + (["norm, head"] if stage == n_stages(cfg, shape) - 1 else [])
            blocks = f"blocks {ids[0]}-{ids[-1]} ({''.join(cfg.model.blocks[i] for i in ids)})"
            lines.append(f"  stage {stage} on pp rank {pp_rank}: {' + '.join([blocks, *ends])}")
    return lines


def n_stages(cfg: RunConfig, shape: dict[str, int]) -> int:
    return shape["pp"] * (cfg.parallel.pp_virtual_stages if shape["pp"] > 1 else 1)


def stage_blocks(cfg: RunConfig, model: HybridLM, shape: dict[str, int], pp_rank: int) -> list[tuple[int, list[int]]]:
    """The stages of a pp rank and the block indices of each."""
    if shape["pp"] == 1:
        return [(0, list(range(cfg.model.n_layers)))]
    modules, ids = build_stage_modules(model, pp_rank, shape["pp"], cfg.parallel.pp_virtual_stages, cfg.train.seq_len)
    return [(stage, [int(i) for i in module.blocks]) for stage, module in zip(ids, modules)]


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def parameter_lines(model: HybridLM) -> list[str]:
    counts = param_counts(model)
    blocks = {kind: sum(1 for b in model.blocks if PATTERN[b.kind] == kind) for kind in counts}
    blocks["mlp"] = sum(1 for b in model.blocks if b.mlp is not None)
    lines = ["parameters:"]
    for kind, n in counts.items():
        where = f"{blocks[kind]} block{'s' if blocks[kind] != 1 else ''}" if blocks.get(kind) else ""
        if kind == "embedding" and model.cfg.tie_embeddings:
            where = "tied with the head"
        lines.append(f"  {kind:<18} {where:<20} {count(n):>9}")
    lines.append(f"  {'total':<18} {'':<20} {count(sum(counts.values())):>9}")
    return lines


def rank_module(cfg: RunConfig, shape: dict[str, int], pp_rank: int) -> torch.nn.Module:
    """What a pp rank holds, as the optimizer sees it (the whole model without PP)."""
    model = meta_model(cfg.model)
    if shape["pp"] == 1:
        return model
    modules, _ = build_stage_modules(model, pp_rank, shape["pp"], cfg.parallel.pp_virtual_stages, cfg.train.seq_len)
    return RankStages(modules)


def micro_batch(cfg: RunConfig, shape: dict[str, int]) -> int:
    return cfg.train.batch_size // (cfg.parallel.microbatches if shape["pp"] > 1 else 1)


def model_activations(cfg: RunConfig, shape: dict[str, int], dtype: torch.dtype) -> tuple[int | None, str]:
    """The whole model's activations on one micro-batch, and a note saying on what (or why not)."""
    t, micro, cp = cfg.train, micro_batch(cfg, shape), shape["cp"]
    loss, _ = resolve_loss(t.loss, assumed_device(cfg)[0], shape)
    piece = t.seq_len // cp
    try:
        whole = activation_bytes(meta_model(cfg.model), micro, piece, dtype, t.activation_checkpoint, t.activation_checkpoint_every, loss)
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        return None, f"not estimated: the model does not run on the meta device ({str(exc).splitlines()[0]})"
    tokens = f"{piece} tokens (its cp piece of {t.seq_len})" if cp > 1 else f"{t.seq_len} tokens"
    return whole, f"micro-batch {micro} x {tokens}, activation checkpointing {t.activation_checkpoint}, loss {loss}"


def estimate_rank(cfg: RunConfig, shape: dict[str, int], pp_rank: int, whole_activations: int | None) -> tuple[MemoryEstimate, int]:
    """A pp rank's estimate (see the module docstring), and the micro-batches it keeps in flight."""
    module = rank_module(cfg, shape, pp_rank)
    shards = shape["tp"] * shape["dp_shard"] * shape["cp"]
    params = sum(p.numel() for p in module.parameters()) * FP32 // shards
    states = state_bytes(module, cfg.optim, shards)
    microbatches = cfg.parallel.microbatches
    in_flight = 1 if shape["pp"] == 1 else (microbatches if cfg.parallel.pp_schedule == "gpipe" else min(shape["pp"], microbatches))
    share = (len(module.blocks) / cfg.model.n_layers) * in_flight / shape["tp"]
    activations = None if whole_activations is None else int(whole_activations * share)
    return MemoryEstimate(params, params, states, activations), in_flight


def memory_lines(cfg: RunConfig, shape: dict[str, int], dtype: torch.dtype) -> list[str]:
    lines = []
    whole, note = model_activations(cfg, shape, dtype)
    for pp_rank in range(shape["pp"]):
        estimate, in_flight = estimate_rank(cfg, shape, pp_rank, whole)
        rank_note = note + (f", {in_flight} micro-batches in flight" if in_flight > 1 and whole is not None else "")
        who = "every rank" if shape["pp"] == 1 else f"each rank of pp rank {pp_rank}"
        states = ", ".join(f"{codec} {size / MiB:.1f}" for codec, size in estimate.states.items())
        activations = f"{estimate.activations / MiB:10.1f} MiB  ({rank_note})" if estimate.activations is not None else f"{'?':>10}      ({rank_note})"
        lines += [
            f"memory estimate, {who}:",
            f"  parameters        {estimate.params / MiB:10.1f} MiB",
            f"  gradients         {estimate.grads / MiB:10.1f} MiB",
            f"  optimizer states  {sum(estimate.states.values()) / MiB:10.1f} MiB  ({states} MiB by codec)",
            f"  activations       {activations}",
            f"  total             {estimate.total / MiB:10.1f} MiB" + ("" if estimate.activations is not None else " (without activations)"),
        ]
    return lines
