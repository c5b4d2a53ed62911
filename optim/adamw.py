"""AdamW with pluggable state codecs: fp32, bf16, int8 (block-wise dynamic map) or fp8 (E4M3 with
COAT's range expansion) moments, chosen per parameter group (`optim/groups.py`).

One update rule for every codec (`optim/update.py`): decode the moments to fp32, take the AdamW
step in fp32 on the parameter (or on its fp32 master copy), encode the moments back. It runs on
many tensors per call (`optim/buckets.py`: buckets of one codec, device and dtypes), eagerly or
`torch.compile`d (`compile`). Two other routes do the same step: torch's fused/foreach AdamW
kernels for fp32 states of fp32 parameters (torch's own state layout), and, when not compiling,
a codec's own fused kernel where it has one that applies (`StateCodec.fused_update_`:
bitsandbytes' 8-bit kernel for int8 states on CUDA). DTensor parameters (FSDP2, TP) are updated
shard by shard; their states are DTensors laid out as one process's (`optim/shards.py`). Where a
layout splits a block between ranks, the step of those shards comes last: the statistics of
every such block, the exchange (one all-reduce per process group), then the step that encodes
with them.
"""
from __future__ import annotations

from itertools import chain
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim.adam import adam as torch_adam

from common.tensors import local_shard
from optim.buckets import Member, Stepper
from optim.codecs import CODECS, StateCodec
from optim.codecs.base import IDENTITY, BlockCodec, Parts, Stats
from optim.config import OptimConfig
from optim.groups import build_param_groups, wants_weight_decay
from optim.offload import OffloadAdamW, build_offload_optimizer
from optim.shards import BlockGrid, block_grid, blocks_like_param, exchange, like_param
from optim.update import adamw_update_

__all__ = ["AdamW", "adamw_update_", "build_optimizer", "wants_weight_decay"]

# torch >= 2.4 (ebb needs >= 2.6) has fused AdamW kernels for both.
FUSED_DEVICE_TYPES = frozenset({"cpu", "cuda"})
MOMENTS = ("exp_avg", "exp_avg_sq")  # the first is signed, the second never negative
# `compile=None` compiles the codec step on these devices once the codec states hold at least
# AUTO_COMPILE_NUMEL elements. On CPU (inductor's C++) the compiled step measured 3x (fp8) to
# 8x (int8) faster than the eager one on the quickstart model, 10x for int8 on large tensors,
# and the quickstart's 200-step run took 17 s instead of 87 s; on CUDA one Triton kernel per
# bucket replaces some thirty launches per tensor (not measured here: no GPU). Below the
# threshold the one-off compile (2-30 s on CPU) costs more than a short run saves.
AUTO_COMPILE_DEVICE_TYPES = frozenset({"cpu", "cuda"})
AUTO_COMPILE_NUMEL = 1 << 20


def fused_available(params: list[nn.Parameter]) -> bool:
    return all(p.device.type in FUSED_DEVICE_TYPES and p.is_floating_point() for p in params)


class AdamW(torch.optim.Optimizer):
    """`state_dtype` names the codec of a group's moments; `master_weights` keeps an fp32 copy
    of every non-fp32 parameter in the state (else such parameters are updated in fp32 and
    rounded back each step); `fused` picks torch's fused kernel for the fp32 route. `compile`:
    run the codec step `torch.compile`d (None: where it pays, `AUTO_COMPILE_*`); `bucket_numel`:
    elements per call of the codec step (None: `optim.buckets.BUCKET_NUMEL`;
    0: one call per parameter, the per-parameter path)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_dtype: str = "fp32",
        master_weights: bool = False,
        fused: bool = False,
        compile: bool | None = None,
        bucket_numel: int | None = None,
    ):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, state_dtype=state_dtype, master_weights=master_weights, fused=fused)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["state_dtype"] not in CODECS:
                raise ValueError(f"unknown state_dtype {group['state_dtype']!r} (one of {', '.join(CODECS)})")
        self.bucket_numel = bucket_numel
        self._stepper = Stepper(compile, self._auto_compile)
        self._grids: dict[tuple[Tensor, int], BlockGrid] = {}
        self._shared: list[tuple[Tensor, BlockCodec]] | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_stepper"):  # more codec states: decide again
            self._stepper.decided.clear()
            self._shared = None

    def _auto_compile(self, device: torch.device) -> bool:
        """Compile where it pays: a device inductor serves, and codec states large enough."""
        codec_numel = sum(
            local_shard(p).numel() for group in self.param_groups for p in group["params"] if p.device == device and not _by_torch(p, group)
        )
        return device.type in AUTO_COMPILE_DEVICE_TYPES and codec_numel >= AUTO_COMPILE_NUMEL

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        shared: dict[Tensor, tuple[BlockCodec, Member, dict[str, Any]]] = {}
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            by_torch = [p for p in params if _by_torch(p, group)]
            if by_torch:
                self._torch_adamw(by_torch, group)
            by_codec = [p for p in params if not _by_torch(p, group)]
            if by_codec:
                self._codec_step(by_codec, group, CODECS[group["state_dtype"]], shared)
        if self._shared_params():
            self._shared_step(shared)
        return loss

    def init_state(self) -> None:
        """Every parameter's state now (zero moments), rather than at its first step."""
        for group in self.param_groups:
            for p in group["params"]:
                self._state(p, group, CODECS[group["state_dtype"]])

    def _grid(self, p: Tensor, codec: StateCodec) -> BlockGrid | None:
        """Where `p`'s shard sits on its global grid of `codec`'s blocks (None: no blocks)."""
        if codec.block is None:
            return None
        if (p, codec.block) not in self._grids:
            self._grids[p, codec.block] = block_grid(p, codec.block)
        return self._grids[p, codec.block]

    def _shared_params(self) -> list[tuple[Tensor, BlockCodec]]:
        """Every parameter whose blocks this rank shares with others, in group order: the same
        list on every rank that shares them, whichever step now."""
        if self._shared is None:
            self._shared = [
                (p, codec) for group in self.param_groups for codec in [CODECS[group["state_dtype"]]]
                for p in group["params"] if (grid := self._grid(p, codec)) is not None and grid.shared
            ]
        return self._shared

    def _state(self, p: Tensor, group: dict[str, Any], codec: StateCodec) -> dict[str, Tensor]:
        """The parameter's state, created on first use: step, the moments' parts, the master copy."""
        state = self.state[p]
        if not state:
            shard = local_shard(p)
            on_device = group["fused"] and _by_torch(p, group)
            state["step"] = torch.zeros((), dtype=torch.float32, device=shard.device if on_device else "cpu")
            grid = self._grid(p, codec)
            for moment in MOMENTS:
                for suffix, part in codec.zeros(shard, grid and grid.parts_shape(shard.shape)).items():
                    state[moment + suffix] = blocks_like_param(part, p, grid) if suffix in codec.block_parts else like_param(part, p)
            if group["master_weights"] and p.dtype != torch.float32:
                state["master"] = like_param(shard.float(), p)
        return state

    def _torch_adamw(self, params: list[Tensor], group: dict[str, Any]) -> None:
        states = [self._state(p, group, CODECS["fp32"]) for p in params]
        beta1, beta2 = group["betas"]
        torch_adam(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            [s["step"] for s in states], fused=group["fused"] or None, decoupled_weight_decay=True, amsgrad=False,
            beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )

    def _codec_step(
        self, params: list[Tensor], group: dict[str, Any], codec: StateCodec, shared: dict[Tensor, tuple[BlockCodec, Member, dict[str, Any]]]
    ) -> None:
        """The codec route: each parameter's member of a bucket, buckets by device, dtypes and step
        count (a parameter that missed steps without a gradient has a smaller count). Members
        whose blocks other ranks share go into `shared`, for `_shared_step`."""
        hyper = dict(lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"])
        kinds: dict[tuple, list[Member]] = {}
        for p in params:
            state = self._state(p, group, codec)
            state["step"] += 1
            step = int(state["step"].item())
            target = (local_shard(state["master"]) if "master" in state else local_shard(p)).detach()  # views of it: no autograd
            grad = local_shard(_placed_like(p.grad, p))
            m, v = (self._parts(state, moment, codec) for moment in MOMENTS)
            param = local_shard(p).detach() if "master" in state else None
            if (grid := self._grid(p, codec)) is not None and grid.shared:
                shared[p] = (codec, Member(target, grad, m, v, param, grid), dict(step=step, **hyper))
                continue
            if not self._stepper.compiles(target.device) and codec.fused_update_(target, grad.to(target.dtype), m, v, step, **hyper):
                if param is not None:
                    param.copy_(target)
                continue
            key = (step, target.device, target.dtype, grad.dtype, None if param is None else param.dtype)
            kinds.setdefault(key, []).append(Member(target, grad, m, v, param))
        for (step, *_), members in kinds.items():
            self._stepper.step(codec, members, dict(step=step, **hyper), self.bucket_numel)

    def _shared_step(self, stepping: dict[Tensor, tuple[BlockCodec, Member, dict[str, Any]]]) -> None:
        """The step of the shards whose blocks other ranks share (`optim/shards.py`): each block's
        statistics, combined over the ranks that share it, then the step encoding with them, and
        the per-block parts of every block of the rows, the same on each of those ranks. Every
        rank runs it at every step: its shared parameters are the others'."""
        shared = self._shared_params()
        combined = {p: self._block_statistics(p, codec, stepping.get(p)) for p, codec in shared}
        exchange([(self._grid(p, codec), stats, codec.statistics) for p, codec in shared for stats in combined[p]])
        for p, (codec, member, hyper) in stepping.items():
            grid = member.grid
            mine = tuple({name: t[..., grid.first : grid.first + grid.count].reshape(-1) for name, t in stats.items()} for stats in combined[p])
            self._stepper.shared_step(codec, member, hyper, mine)
            for parts, stats in zip((member.m, member.v), combined[p]):
                for suffix, value in codec.scales(stats).items():
                    parts[suffix].copy_(value)

    def _block_statistics(self, p: Tensor, codec: BlockCodec, stepping: tuple[BlockCodec, Member, dict[str, Any]] | None) -> list[Stats]:
        """Per moment, the statistics of every block of `p`'s local rows from this rank's pieces of
        them after this step (blocks it holds nothing of, or a step it does not take: each
        statistic's identity)."""
        grid = self._grid(p, codec)
        rows = grid.parts_shape(local_shard(p).shape)
        moments = [{name: torch.full(rows, IDENTITY[how], device=local_shard(p).device) for name, how in codec.statistics.items()} for _ in MOMENTS]
        if stepping is not None:
            _, member, hyper = stepping
            for full, mine in zip(moments, self._stepper.shared_statistics(codec, member, hyper)):
                for name, t in mine.items():
                    full[name][..., grid.first : grid.first + grid.count] = t.view(full[name][..., : grid.count].shape)
        return moments

    @staticmethod
    def _parts(state: dict[str, Tensor], moment: str, codec: StateCodec) -> Parts:
        """The local tensors of one moment's parts, keyed by suffix."""
        return {suffix: local_shard(state[moment + suffix]) for suffix in codec.suffixes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader casts every floating state tensor to its parameter's dtype, which would
        round fp32 scales and master copies next to bf16 parameters: load the groups with it, and
        the state here, keeping dtypes and moving tensors only to where `_state` keeps them."""
        super().load_state_dict({**state_dict, "state": {}})
        self._shared = None  # the groups are new dicts
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        owned = ((p, group) for group in self.param_groups for p in group["params"])
        for saved_id, (p, group) in zip(saved_ids, owned):
            saved = state_dict["state"].get(saved_id)
            if saved is not None:
                step_device = local_shard(p).device if _by_torch(p, group) and group["fused"] else "cpu"
                self.state[p] = {key: value.to(step_device if key == "step" else local_shard(p).device) for key, value in saved.items()}


def _placed_like(grad: Tensor, p: Tensor) -> Tensor:
    """The gradient with its parameter's placements (e.g. a pending sum made Replicate), so
    that its local shard lines up with the parameter's."""
    if isinstance(grad, DTensor) and grad.placements != p.placements:
        return grad.redistribute(placements=p.placements)
    return grad


def _by_torch(p: Tensor, group: dict[str, Any]) -> bool:
    """torch's AdamW kernels update fp32 parameters with fp32 states."""
    return group["state_dtype"] == "fp32" and p.dtype == torch.float32


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> AdamW | OffloadAdamW:
    """AdamW over `model`'s parameter groups (`optim/groups.py`); `fused: None` = where available.
    With `optim.offload.enabled`, the same AdamW with its state in host memory (`optim/offload/`)."""
    groups = build_param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    fused = fused_available(params) if cfg.fused is None else cfg.fused
    if cfg.offload.enabled:  # with AdamW's group keys, so that either loads the other's state dict
        groups = [{"fused": fused, "master_weights": cfg.master_weights, **g} for g in groups]
        low_bit = [g for g in groups if g["state_dtype"] != "fp32"]  # their states stay on the device, stepped by AdamW
        on_device = AdamW(low_bit, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, compile=cfg.compile) if low_bit else None
        return build_offload_optimizer(model, groups, cfg, on_device)
    return AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
        state_dtype=cfg.state_dtype, master_weights=cfg.master_weights, fused=fused, compile=cfg.compile,
    )
