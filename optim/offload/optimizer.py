"""`OffloadAdamW`: AdamW whose fp32 master weights and moments live in host memory, updated in
subgroups, some on the host and some on the accelerator, interleaved.

Layout. Every parameter's local shard (each rank offloads its own) has a place in flat host
buffers, in parameter-group order: `master`, `exp_avg`, `exp_avg_sq` (the state) and `grad`
(gradients of host-updated pieces). Subgroups are consecutive ranges of `subgroup_size`
elements; a parameter may straddle two, each part a `Piece`. The optimizer's state holds, per
parameter, views of these buffers shaped like its shard (DTensors placed like it under FSDP2 or
TP), so `state_dict()` is ebb's AdamW layout (`step`, `exp_avg`, `exp_avg_sq`; `master` for
non-fp32 parameters) made of the host buffers themselves, and a checkpoint loads with offload
off or another subgroup size.

Step (`model.on_device` says where each subgroup goes):
- during backward, a post-accumulate-grad hook copies each host piece's gradient to host memory
  on a side lane as soon as it is ready in the step's last backward (`backwards_per_step`: the
  micro-batches of gradient accumulation or of the pipeline); a gradient no hook copied, or
  changed afterwards, is copied at the step: its version counter tells, or `clip_grad_norm_`
  (an in-place op on a DTensor leaves the counter as it was);
- the first device subgroup's state is prefetched; then in order, a host subgroup is updated by
  the host optimizer and its parameters uploaded on the host-to-device lane, while a device
  subgroup is updated by ebb's grouped step (`optim/buckets.py`) on its prefetched state, written
  back on the device-to-host lane, and the next device subgroup prefetched into the other
  staging slot. The host's work hides the transfers.
- before a subgroup's host state changes (its host update, or the write-back of its device
  update), the update pre-hooks run with its element range: a lazy checkpoint still writing
  that state in place copies it aside or waits there (checkpoint/resident.py).
Clipping (`clip_grad_norm_`) takes the global norm over every gradient, as `nn.utils` does,
clips the gradients on the device in place and the host copies by the same coefficient.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from common.tensors import local_shard
from optim.buckets import Member, Stepper
from optim.codecs import CODECS
from optim.offload.device import Lane, copy, host_empty, wait
from optim.offload.host import HostAdamW
from optim.offload.model import on_device
from optim.shards import like_param

FP32 = CODECS["fp32"]


class OffloadError(ValueError):
    """An offload that cannot start (no room for a subgroup, a host optimizer that cannot run,
    host memory that cannot be pinned); the message is one line naming the cause."""


@dataclass
class Piece:
    """Elements `offset:offset + stop - start` of `param`'s flat local shard, at `start:stop` in
    the host buffers; `group` indexes the optimizer's parameter groups."""

    param: nn.Parameter
    group: int
    start: int
    stop: int
    offset: int

    def local(self, t: Tensor) -> Tensor:
        """This piece of `t`, a tensor shaped like the parameter (its local shard is taken)."""
        return local_shard(t).detach().view(-1)[self.offset : self.offset + self.stop - self.start]


@dataclass
class Subgroup:
    start: int
    stop: int
    on_device: bool
    pieces: list[Piece] = field(default_factory=list)


def offloaded(group: dict[str, Any]) -> bool:
    """Whether a parameter group's state lives in host memory (fp32 states; low-bit ones stay on the device)."""
    return group.get("state_dtype", "fp32") == "fp32"


def cut(groups: list[dict[str, Any]], subgroup_size: int, k: int) -> tuple[list[Subgroup], int]:
    """The subgroups of the offloaded `groups`' parameters (their local shards, in order) and the
    elements in all."""
    subgroups: list[Subgroup] = []
    total = 0
    for index, group in enumerate(groups):
        for p in group["params"] if offloaded(group) else ():
            numel, offset = local_shard(p).numel(), 0
            while offset < numel:
                if not subgroups or subgroups[-1].stop - subgroups[-1].start == subgroup_size:
                    subgroups.append(Subgroup(total, total, on_device(len(subgroups), k)))
                last = subgroups[-1]
                take = min(numel - offset, subgroup_size - (last.stop - last.start))
                last.pieces.append(Piece(p, index, total, total + take, offset))
                last.stop += take
                total += take
                offset += take
    return subgroups, total


class Slot:
    """Accelerator memory for one subgroup's state: master, exp_avg, exp_avg_sq."""

    def __init__(self, numel: int, device: torch.device):
        self.master, self.exp_avg, self.exp_avg_sq = (torch.empty(numel, dtype=torch.float32, device=device) for _ in range(3))
        self.ready: Any | None = None  # the prefetch the update waits for
        self.written: Any | None = None  # the write-back that must finish before the slot is refilled


class OffloadAdamW(torch.optim.Optimizer):
    """AdamW over `params` (parameter groups as ebb's AdamW takes them) with its fp32 state in
    host memory (pinned when `device` is a GPU), cut into subgroups of `subgroup_size` elements;
    every `k`-th on the accelerator (`optim.offload.model`), `slots` of them staged there at once.
    `host` updates the others. Groups of low-bit states are `on_device`'s (ebb's AdamW over the
    same group dicts), whose state this optimizer's `state` holds too."""

    def __init__(
        self, params: Iterable[Any], host: HostAdamW, device: torch.device, subgroup_size: int, k: int, slots: int = 2,
        lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
        compile: bool | None = None, on_device: torch.optim.Optimizer | None = None,
    ):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.on_device = on_device
        self.host, self.device, self.k = host, device, k
        self.subgroups, total = cut(self.param_groups, subgroup_size, k)
        pin = device.type == "cuda"
        try:
            self.master, self.exp_avg, self.exp_avg_sq, self.grad = (host_empty(total, torch.float32, pin) for _ in range(4))
            self.uploads = {dtype: host_empty(total, dtype, pin) for dtype in self._param_dtypes() if pin}
        except RuntimeError as exc:
            what = f"{16 * total / 2**30:.3g} GiB of {'pinned ' if pin else ''}host memory"
            raise OffloadError(f"cannot allocate {what} for the offloaded optimizer state: {str(exc).strip().splitlines()[0]}") from None
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        device_numel = max((s.stop - s.start for s in self.subgroups if s.on_device), default=0)
        self.slots = [Slot(device_numel, device) for _ in range(slots)] if device_numel else []
        self.h2d, self.d2h = Lane(device), Lane(device)
        self.stepper = Stepper(compile, lambda d: d.type == "cuda")
        self.host_pieces: dict[nn.Parameter, list[Piece]] = {}
        for piece in (p for s in self.subgroups if not s.on_device for p in s.pieces):
            self.host_pieces.setdefault(piece.param, []).append(piece)
        on_accelerator = {piece.param for s in self.subgroups if s.on_device for piece in s.pieces}
        self.host_only = set(self.host_pieces) - on_accelerator  # their device gradients are never clipped (`clip_grad_norm_`)
        self.copied: dict[nn.Parameter, tuple[int, int]] = {}  # gradient (data pointer, version) the host copy holds
        self.clip: Tensor | None = None  # the coefficient the host copies still need
        self.backwards_per_step = 1  # micro-batches a step accumulates (the trainer sets it): the hooks copy at the last
        self.accumulated: dict[nn.Parameter, int] = {}  # backwards that reached each gradient this step
        starts = {piece.param: piece.start for s in reversed(self.subgroups) for piece in reversed(s.pieces)}  # each one's first
        self._views = {p: self._new_state(p, starts.get(p, 0)) for group in self.param_groups if offloaded(group) for p in group["params"]}
        self.state.update(self._views)
        if on_device is not None:
            on_device.state = self.state
            on_device.init_state()  # so that a checkpoint's template asks for them before the first step
        self._refresh_master()
        self.update_pre_hooks: OrderedDict[int, Callable[[int, int], None]] = OrderedDict()
        self.hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in self.host_pieces]

    @property
    def host_resident(self) -> tuple[Tensor, ...]:
        """The host buffers its state dict is made of: a lazy checkpoint writes them in place."""
        return self.master, self.exp_avg, self.exp_avg_sq

    @property
    def update_order(self) -> list[tuple[int, int]]:
        """The element ranges of `host_resident` a step modifies, one per subgroup, in the order it does."""
        return [(s.start, s.stop) for s in self.subgroups]

    def register_update_pre_hook(self, hook: Callable[[int, int], None]) -> RemovableHandle:
        """`hook(start, stop)` runs on the training thread right before a step modifies elements
        `start:stop` of every `host_resident` buffer (one range of `update_order`)."""
        handle = RemovableHandle(self.update_pre_hooks)
        self.update_pre_hooks[handle.id] = hook
        return handle

    def _before_update(self, s: Subgroup) -> None:
        for hook in list(self.update_pre_hooks.values()):
            hook(s.start, s.stop)

    def _param_dtypes(self) -> set[torch.dtype]:
        return {p.dtype for group in self.param_groups if offloaded(group) for p in group["params"] if p.dtype != torch.float32}

    def _new_state(self, p: nn.Parameter, start: int) -> dict[str, Tensor]:
        """`p`'s state as views of the host buffers from `start`, shaped like its local shard."""
        shape = local_shard(p).shape
        view = lambda buffer: like_param(buffer[start : start + shape.numel()].view(shape), p)  # noqa: E731
        state = {"step": torch.zeros((), dtype=torch.float32), "exp_avg": view(self.exp_avg), "exp_avg_sq": view(self.exp_avg_sq)}
        if p.dtype != torch.float32:
            state["master"] = view(self.master)
        return state

    def _refresh_master(self, params: Iterable[nn.Parameter] | None = None) -> None:
        """The master copy from the parameters (all, or `params`)."""
        wanted = None if params is None else set(params)
        for s in self.subgroups:
            for piece in s.pieces:
                if wanted is None or piece.param in wanted:
                    self.master[piece.start : piece.stop].copy_(piece.local(piece.param))

    # gradients

    def _grad_ready(self, p: nn.Parameter) -> None:
        """Backward has (re)accumulated `p`'s gradient: in the step's last backward, copy it."""
        self.accumulated[p] = self.accumulated.get(p, 0) + 1
        if self.accumulated[p] >= self.backwards_per_step:
            self._copy_grad(p)

    def _copy_grad(self, p: nn.Parameter) -> None:
        """Copy the host pieces of `p`'s gradient to host memory, on the device-to-host lane."""
        grad = _local_grad(p)
        self.d2h.follow()
        with self.d2h.use():
            for piece in self.host_pieces[p]:
                copy(self.grad[piece.start : piece.stop], piece.local(grad))
        self.copied[p] = _version(p.grad)

    def _host_grads_current(self) -> None:
        """Copy again the host pieces whose gradient changed since the hook copied it (or that no
        hook copied), and wait for every copy; then clip the copies of the gradients that
        `clip_grad_norm_` left unclipped on the device."""
        for p in self.host_pieces:
            if p.grad is not None and self.copied.get(p) != _version(p.grad):
                self._copy_grad(p)
        wait(self.d2h.mark())
        if self.clip is not None and (coef := self.clip.item()) != 1.0:
            unclipped = [piece for p in self.host_only if p.grad is not None for piece in self.host_pieces[p]]
            if unclipped:
                torch._foreach_mul_([self.grad[piece.start : piece.stop] for piece in unclipped], coef)

    def clip_grad_norm_(self, params: Iterable[nn.Parameter], max_norm: float) -> Tensor:
        """`nn.utils.clip_grad_norm_(params, max_norm)`: the norm of every gradient together; the
        device gradients of parameters updated wholly on the host are left as they are, and
        their host copies are scaled by the same coefficient at the step."""
        params = [p for p in params if p.grad is not None]
        total = nn.utils.get_total_norm([p.grad for p in params])
        clipped = [p for p in params if p not in self.host_only]
        nn.utils.clip_grads_with_norm_(clipped, max_norm, total)
        for p in clipped:  # clipped in place: their host pieces are copied again at the step (an in-place op on a DTensor leaves its version counter as it was)
            self.copied.pop(p, None)
        norm = total.full_tensor() if isinstance(total, DTensor) else total
        self.clip = torch.clamp(max_norm / (norm + 1e-6), max=1.0).cpu()
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.copied.clear()
        self.accumulated.clear()
        self.clip = None

    # the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepping = {p for group in self.param_groups if offloaded(group) for p in group["params"] if p.grad is not None}
        for p in stepping:
            self.state[p]["step"] += 1
        self.h2d.follow()  # uploads and prefetches after the backward's use of the parameters
        self._host_grads_current()  # (its wait follows the backward, hence the last step's uploads too)
        if self.on_device is not None:
            self.on_device.step()  # queued on the device, where it runs while the host works
        device_subgroups = [s for s in self.subgroups if s.on_device]
        if device_subgroups:
            self._prefetch(device_subgroups[0], self.slots[0])
        done = 0
        for s in self.subgroups:
            if not s.on_device:
                self._host_update(s, stepping)
                continue
            slot = self.slots[done % len(self.slots)]
            self._device_update(s, slot, stepping)
            done += 1
            if done < len(device_subgroups):
                self._prefetch(device_subgroups[done], self.slots[done % len(self.slots)])
        wait(self.d2h.mark())  # the host state is whole again (checkpoints read it)
        self.h2d.join()  # the next forward runs on the uploaded parameters
        self.copied.clear()
        self.accumulated.clear()
        self.clip = None
        return loss

    def _by_group(self, s: Subgroup, stepping: set[nn.Parameter]) -> dict[tuple[int, int], list[Piece]]:
        """The subgroup's stepping pieces by (parameter group, step count)."""
        kinds: dict[tuple[int, int], list[Piece]] = {}
        for piece in s.pieces:
            if piece.param in stepping:
                kinds.setdefault((piece.group, int(self.state[piece.param]["step"].item())), []).append(piece)
        return kinds

    def _host_update(self, s: Subgroup, stepping: set[nn.Parameter]) -> None:
        self._before_update(s)
        for (index, _), pieces in self._by_group(s, stepping).items():
            group = self.param_groups[index]
            take = lambda buffer: [buffer[piece.start : piece.stop] for piece in pieces]  # noqa: E731
            self.host.update(
                take(self.master), take(self.grad), take(self.exp_avg), take(self.exp_avg_sq), [self.state[piece.param]["step"] for piece in pieces],
                lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
            )
        self._upload(s)

    def _upload(self, s: Subgroup) -> None:
        """The subgroup's updated master into the parameters (cast on the host first, if pinned)."""
        with self.h2d.use():
            for piece in s.pieces:
                master = self.master[piece.start : piece.stop]
                if (upload := self.uploads.get(piece.param.dtype)) is not None:
                    master = upload[piece.start : piece.stop]
                    master.copy_(self.master[piece.start : piece.stop])
                copy(piece.local(piece.param), master)

    def _prefetch(self, s: Subgroup, slot: Slot) -> None:
        if slot.written is not None:
            self.h2d.follow(slot.written)
        numel = s.stop - s.start
        with self.h2d.use():
            for name in ("master", "exp_avg", "exp_avg_sq"):
                copy(getattr(slot, name)[:numel], getattr(self, name)[s.start : s.stop])
        slot.ready = self.h2d.mark()

    def _device_update(self, s: Subgroup, slot: Slot, stepping: set[nn.Parameter]) -> None:
        """ebb's grouped fp32 step on the prefetched state; the parameters get the result, the
        state goes back to the host."""
        if slot.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        for (index, step), pieces in self._by_group(s, stepping).items():
            group = self.param_groups[index]
            members = [self._member(piece, slot, s.start) for piece in pieces]
            hyper = dict(step=step, lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"])
            self.stepper.step(FP32, members, hyper, None)
        self.d2h.follow()
        self._before_update(s)
        numel = s.stop - s.start
        with self.d2h.use():
            for name in ("master", "exp_avg", "exp_avg_sq"):
                copy(getattr(self, name)[s.start : s.stop], getattr(slot, name)[:numel])
        slot.written = self.d2h.mark()

    @staticmethod
    def _member(piece: Piece, slot: Slot, base: int) -> Member:
        at = slice(piece.start - base, piece.stop - base)
        return Member(slot.master[at], piece.local(_local_grad(piece.param)), {"": slot.exp_avg[at]}, {"": slot.exp_avg_sq[at]}, piece.local(piece.param))

    # checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The groups as torch loads them; each parameter's state copied into its host views (DCP
        may have loaded into them already); the master from the parameter where the checkpoint
        has none (fp32 parameters, or saved without offload)."""
        super().load_state_dict({**state_dict, "state": {}})
        self.state.update(self._views)
        if self.on_device is not None:
            self._load_on_device(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"] if offloaded(g))
        owned = (p for group in self.param_groups if offloaded(group) for p in group["params"])
        unmastered = []
        for saved_id, p in zip(saved_ids, owned):
            saved = state_dict["state"].get(saved_id, {})
            for key, value in saved.items():
                if key in self._views[p]:
                    _copy_into(local_shard(self._views[p][key]), local_shard(value))
            if "master" not in saved:
                unmastered.append(p)
        self._refresh_master(unmastered)


    def _load_on_device(self, state_dict: dict[str, Any]) -> None:
        """The low-bit groups' part of `state_dict` into `on_device`, whose new group dicts then
        take their places here, and whose state is this one's again."""
        positions = [i for i, g in enumerate(state_dict["param_groups"]) if not offloaded(g)]
        groups = [state_dict["param_groups"][i] for i in positions]
        ids = {i for g in groups for i in g["params"]}
        self.on_device.load_state_dict({"param_groups": groups, "state": {i: s for i, s in state_dict["state"].items() if i in ids}})
        for position, group in zip(positions, self.on_device.param_groups):
            self.param_groups[position] = group
        self.state.update(self.on_device.state)
        self.on_device.state = self.state


def _local_grad(p: nn.Parameter) -> Tensor:
    """`p`'s gradient as a plain tensor shaped like its local shard (placed like `p` first)."""
    grad = p.grad
    if isinstance(grad, DTensor) and grad.placements != p.placements:
        grad = grad.redistribute(placements=p.placements)
    return local_shard(grad)


def _version(grad: Tensor) -> tuple[int, int]:
    local = local_shard(grad)
    return local.data_ptr(), local._version


def _copy_into(dst: Tensor, src: Tensor) -> None:
    if dst.data_ptr() != src.data_ptr():
        dst.copy_(src)
