"""What a run will hold, worked out on the meta device (shapes without data, so nothing is
allocated): parameter counts, optimizer-state bytes by codec, the size of one checkpoint, and
the activations of one micro-batch. The dry run prints them; the run checks the checkpoint
directory's free space with them before its first step.

Activations are measured, not modelled: one forward and backward of the model on the meta device
under torch's `MemTracker` (the tool behind torchtitan's memory estimation), which follows every
tensor the step creates and frees, so each mixer's own chunked ops, temporaries and the loss
(the cross-entropy over the whole logits, or the chunked linear one) are counted as they happen. Parameters, gradients and optimizer
states are counted from the shapes (each codec's parts for each tensor, as the optimizer's groups
assign them).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.config import ModelConfig
from models.mixers import PATTERN
from models.model import HybridLM
from optim.codecs import CODECS
from optim.config import OptimConfig
from optim.groups import build_param_groups
from optim.offload.model import STATE_BYTES
from parallel.data_parallel import apply_activation_checkpointing
from pretrain.linear_ce import chunked_linear_cross_entropy
from pretrain.loss import lm_loss

FP32 = 4  # bytes: parameters and gradients are float32 (autocast computes in bf16 from them)


def meta_model(cfg: ModelConfig) -> HybridLM:
    """The model with shapes and no storage."""
    with torch.device("meta"):
        return HybridLM(cfg)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def param_counts(model: HybridLM) -> dict[str, int]:
    """Parameters by what holds them: each mixer kind (by name), the MLPs with their norms, the
    embedding and the head (one table when tied)."""
    counts: Counter[str] = Counter()
    for block in model.blocks:
        counts[PATTERN[block.kind]] += sum(p.numel() for p in block.mixer.parameters()) + block.mixer_norm.weight.numel()
    for block in model.blocks:
        counts["mlp"] += sum(p.numel() for name, p in block.named_parameters() if not name.startswith(("mixer.", "mixer_norm.")))
    counts["embedding"] = model.embed.weight.numel()
    if not model.cfg.tie_embeddings:
        counts["head"] = model.lm_head.weight.numel()
    counts["final norm"] = model.norm.weight.numel()
    return dict(counts)


def state_bytes(module: nn.Module, cfg: OptimConfig, shards: int = 1) -> dict[str, int]:
    """Optimizer-state bytes by codec for the parameters of `module`: both moments' parts as the
    optimizer's groups assign codecs (small tensors and overrides included), plus fp32 master
    copies where asked; divided over `shards` ranks. With `optim.offload` the fp32 states live in
    host memory: the device holds two subgroups' staging (fp32 master and moments) instead."""
    by_codec: Counter[str] = Counter()
    offloaded = 0
    for group in build_param_groups(module, cfg):
        codec = CODECS[group["state_dtype"]]
        for param in group["params"]:
            if cfg.offload.enabled and codec.name == "fp32":
                offloaded += param.numel()
                continue
            parts = codec.zeros(torch.empty(param.shape, dtype=param.dtype, device="meta"))
            by_codec[codec.name] += 2 * sum(tensor_bytes(t) for t in parts.values())
            if cfg.master_weights and param.dtype != torch.float32:
                by_codec["master weights"] += param.numel() * FP32
    per_rank = {name: math.ceil(size / shards) for name, size in by_codec.items()}
    if offloaded:
        per_rank["offload staging"] = 2 * STATE_BYTES * min(cfg.offload.subgroup_size, math.ceil(offloaded / shards))
    return per_rank


def checkpoint_bytes(model: HybridLM, cfg: OptimConfig) -> int:
    """One checkpoint: the weights (the tied head once) and the optimizer state."""
    weights = sum(p.numel() for p in model.parameters()) * FP32
    return weights + sum(state_bytes(model, cfg).values())


def activation_bytes(
    module: nn.Module, batch: int, seq_len: int, dtype: torch.dtype, checkpointing: str, every: int, loss: str = "full",
) -> int:
    """Peak bytes of activations and temporaries in one forward and backward of `module` (a meta
    HybridLM) on a micro-batch of `batch` x `seq_len` tokens, with activation checkpointing as
    configured: torch's MemTracker's peak, less what parameters and gradients hold then. `dtype`
    is the compute dtype (bf16 autocast is approximated by a bf16 model: its matmuls keep bf16
    activations as autocast's do). `loss` is the run's resolved `train.loss`: `full` makes the
    whole logits; `chunked` and `fused` are counted as the chunked loss (the fused kernels need
    CUDA, and hold less: README, Loss)."""
    module = module.to(dtype)
    apply_activation_checkpointing(module, checkpointing, every)
    ids = torch.zeros(batch, seq_len + 1, dtype=torch.long, device="meta")
    tracker = peak_tracker()
    tracker.track_external(module)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    with tracker:
        if loss == "full":
            lm_loss(module(inputs), labels, reduction="sum").backward()
        else:
            module(inputs, head=lambda hidden, weight: chunked_linear_cross_entropy(hidden, weight, labels)).backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("meta")]
    return sum(size for kind, size in peak.items() if str(kind).endswith(("ACT", "TEMP")))


def peak_tracker() -> Any:
    """torch's MemTracker keeping only the whole-process peak the estimate reads. Its own update
    also keeps every module's peak, a pass over every module at every op: minutes for a model of
    24+ blocks, where this takes seconds (the same peak)."""
    from copy import deepcopy

    from torch.distributed._tools import mem_tracker  # torch's own; imported for the estimate only

    class PeakTracker(mem_tracker.MemTracker):
        def _update_peak_stats(self, peak_state: Any) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot[mem_tracker._TOTAL_KEY]:
                    self._peak_mem[device] = snapshot[mem_tracker._TOTAL_KEY]
                    self._peak_mem_snap[device] = deepcopy(snapshot)

    return PeakTracker()


@dataclass(frozen=True)
class MemoryEstimate:
    """One rank's bytes at its peak: what it holds all along and what one step adds."""

    params: int
    grads: int
    states: dict[str, int]  # by codec
    activations: int | None  # None where the model cannot run on the meta device

    @property
    def total(self) -> int:
        return self.params + self.grads + sum(self.states.values()) + (self.activations or 0)
