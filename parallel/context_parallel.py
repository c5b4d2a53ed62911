"""Context parallelism: the communication behind `models.context` on a torch.distributed group,
and the entry points a training loop uses.

    cp = apply_context_parallel(model, mesh["cp"].get_group())      # once, after building
    input_ids, labels, cu_seqlens, piece = cp.cut(input_ids, labels, cu_seqlens)   # every batch
    with context_parallel(piece):                                  # forward and backward
        loss = loss_of(model(input_ids, cu_seqlens=cu_seqlens), labels)
        loss.backward()

Each rank's parameter gradients are its piece's share: summed over the cp ranks (FSDP over
dp x cp, or an all-reduce) they are the whole batch's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from models.config import ModelConfig
from models.context import Piece, context_parallel, cut_batch
from models.mixers import SPECS

__all__ = ["GroupComm", "ContextParallel", "apply_context_parallel", "check_context_parallel", "context_parallel"]


def _ordering(after: Tensor | None, like: Tensor) -> Tensor:
    """The `after` input of an exchange: a tensor its backward hands a zero gradient, so that
    the previous exchange's backward waits for this one's."""
    return like.new_zeros(()) if after is None else after


class _AllGather(torch.autograd.Function):
    """[size, *x.shape] from every rank; the backward sums each rank's slice of the gradient
    over the ranks back to that rank."""

    @staticmethod
    def forward(ctx, x: Tensor, after: Tensor, comm: GroupComm) -> Tensor:
        ctx.comm, ctx.after = comm, (after.shape, after.dtype, after.device)
        comm.sent_bytes += (comm.size - 1) * x.numel() * x.element_size()
        parts = [torch.empty_like(x) for _ in range(comm.size)]
        dist.all_gather(parts, x.contiguous(), group=comm.group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        comm = ctx.comm
        grad = grad.contiguous()
        comm.sent_bytes += (comm.size - 1) * grad[0].numel() * grad.element_size()  # a reduce-scatter's share
        if dist.get_backend(comm.group) == dist.Backend.GLOO:  # gloo has no reduce-scatter
            dist.all_reduce(grad, group=comm.group)
            mine = grad[comm.rank]
        else:
            mine = torch.empty_like(grad[0])
            dist.reduce_scatter_tensor(mine, grad, group=comm.group)
        return mine, _zeros(ctx.after), None


class _FromPrevious(torch.autograd.Function):
    """Rank r receives rank r - 1's tensor (rank 0 zeros); the gradient goes back the other way."""

    @staticmethod
    def forward(ctx, x: Tensor, after: Tensor, comm: GroupComm) -> Tensor:
        ctx.comm, ctx.after = comm, (after.shape, after.dtype, after.device)
        return comm.shift(x.contiguous(), forward=True)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        return ctx.comm.shift(grad.contiguous(), forward=False), _zeros(ctx.after), None


class _Receive(torch.autograd.Function):
    """What the previous rank sends (zeros on rank 0); the gradient goes back to it."""

    @staticmethod
    def forward(ctx, like: Tensor, after: Tensor, comm: GroupComm) -> Tensor:
        ctx.comm, ctx.like, ctx.after = comm, (like.shape, like.dtype, like.device), (after.shape, after.dtype, after.device)
        received = torch.zeros_like(like)
        if comm.rank > 0:
            dist.recv(received, dist.get_global_rank(comm.group, comm.rank - 1), group=comm.group)
        return received

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        comm = ctx.comm
        if comm.rank > 0:
            comm.sent_bytes += grad.numel() * grad.element_size()
            dist.send(grad.contiguous(), dist.get_global_rank(comm.group, comm.rank - 1), group=comm.group)
        return _zeros(ctx.like), _zeros(ctx.after), None


class _Send(torch.autograd.Function):
    """x to the next rank (nothing on the last); a scalar token whose backward receives x's gradient from it."""

    @staticmethod
    def forward(ctx, x: Tensor, after: Tensor, comm: GroupComm) -> Tensor:
        ctx.comm, ctx.x, ctx.after = comm, (x.shape, x.dtype, x.device), (after.shape, after.dtype, after.device)
        if comm.rank < comm.size - 1:
            comm.sent_bytes += x.numel() * x.element_size()
            dist.send(x.contiguous(), dist.get_global_rank(comm.group, comm.rank + 1), group=comm.group)
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, token_grad: Tensor) -> tuple[Tensor, Tensor, None]:
        comm = ctx.comm
        grad = _zeros(ctx.x)
        if comm.rank < comm.size - 1:
            dist.recv(grad, dist.get_global_rank(comm.group, comm.rank + 1), group=comm.group)
        return grad, _zeros(ctx.after), None


def _zeros(spec: tuple[torch.Size, torch.dtype, torch.device]) -> Tensor:
    shape, dtype, device = spec
    return torch.zeros(shape, dtype=dtype, device=device)


@dataclass
class GroupComm:
    """`models.context.ContextComm` on a process group (gloo or NCCL)."""

    group: ProcessGroup

    def __post_init__(self) -> None:
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.sent_bytes = 0  # by this rank, forward and backward exchanges together (benchmarks read it)

    def all_gather(self, x: Tensor, after: Tensor | None = None) -> Tensor:
        return _AllGather.apply(x, _ordering(after, x), self)

    def from_previous(self, x: Tensor, after: Tensor | None = None) -> Tensor:
        return _FromPrevious.apply(x, _ordering(after, x), self)

    def receive(self, like: Tensor, after: Tensor | None = None) -> Tensor:
        return _Receive.apply(like, _ordering(after, like), self)

    def send(self, x: Tensor, after: Tensor | None = None) -> Tensor:
        return _Send.apply(x, _ordering(after, x), self)

    def shift(self, x: Tensor, forward: bool) -> Tensor:
        """Send x one rank on (to rank + 1, or back to rank - 1) and return what arrives from the
        other side (zeros at the end of the line)."""
        to, source = (self.rank + 1, self.rank - 1) if forward else (self.rank - 1, self.rank + 1)
        received = torch.zeros_like(x)
        ops = []
        if 0 <= to < self.size:
            self.sent_bytes += x.numel() * x.element_size()
            ops.append(dist.P2POp(dist.isend, x, dist.get_global_rank(self.group, to), self.group))
        if 0 <= source < self.size:
            ops.append(dist.P2POp(dist.irecv, received, dist.get_global_rank(self.group, source), self.group))
        for request in dist.batch_isend_irecv(ops) if ops else []:
            request.wait()
        return received


@dataclass
class ContextParallel:
    """Context parallelism turned on for a model: cuts batches into this rank's pieces."""

    comm: GroupComm

    def cut(self, input_ids: Tensor, labels: Tensor, cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Piece]:
        """This rank's piece of a whole batch (every cp rank holds the same batch): input_ids and
        labels [B, T / cp] (labels shifted over the whole rows before), the piece's cu_seqlens for
        the model, and the `Piece` to make active around forward and backward."""
        input_ids, labels, local_cu_seqlens, doc_starts = cut_batch(input_ids, labels, cu_seqlens, self.comm.rank, self.comm.size)
        return input_ids, labels, local_cu_seqlens, Piece(self.comm, input_ids.shape[0], input_ids.shape[1], doc_starts)


def check_context_parallel(model: ModelConfig, seq_len: int, cp: int) -> None:
    """Raise ValueError (one line, naming the keys) when sequences of `seq_len` tokens cannot be
    cut into `cp` pieces for this model: a length cp does not divide, a piece shorter than what a
    mixer reads of the previous one, MoM's capacity (it needs whole documents)."""
    if seq_len % cp:
        raise ValueError(f"train.seq_len ({seq_len}) must be divisible by parallel.cp ({cp})")
    piece = seq_len // cp
    for name in dict.fromkeys(model.mixer_names):
        plan, section = SPECS[name].module.cp_plan, model.mixer_config(name)
        if plan is None:
            raise ValueError(f"parallel.cp ({cp}): mixer {name} declares no context-parallel plan")
        if plan.halo(section) > piece:
            raise ValueError(f"parallel.cp ({cp}): pieces of {piece} tokens are shorter than the {plan.halo(section)} tokens {name} reads before each piece")
    if "mom" in model.mixer_names and model.mixers.mom.capacity:
        raise ValueError("mixers.mom.capacity needs whole documents: set it to null with parallel.cp > 1")


def undeclared_mixers(model: nn.Module) -> list[str]:
    """The mixer classes of `model` that declare no context-parallel plan."""
    return sorted({type(m).__name__ for m in model.modules() if hasattr(m, "tp_plan") and hasattr(m, "cp_plan") and m.cp_plan is None})


def apply_context_parallel(model: nn.Module, group: ProcessGroup) -> ContextParallel:
    """Context parallelism over `group` (the mesh's cp dim) for a built model; raises ValueError
    naming the mixers that declare no cp_plan. Nothing in the model changes: its mixers reach
    the communication through the active `Piece`."""
    missing = undeclared_mixers(model)
    if missing:
        raise ValueError(f"context parallelism: {', '.join(missing)} declare no cp_plan (models/spec.py ContextParallelPlan)")
    return ContextParallel(GroupComm(group))
