"""The head and the cross-entropy as one op that never holds the whole logits (`train.loss`).

- `full`: today's `lm_head` then `lm_loss`: [tokens, vocab] float32 logits and their gradient.
- `chunked`: `chunked_linear_cross_entropy`, pure PyTorch on any device: the tokens are cut into
  chunks of about `CHUNK_ELEMENTS / vocab` rows; each chunk's logits are computed, reduced to its
  loss and, when a gradient is wanted, turned at once into that chunk's gradient for the hidden
  states and its share of the head's gradient (liger's scheme), then freed. Backward only scales
  the saved gradients, so neither pass holds more than one chunk's logits.
- `fused`: a Triton kernel of the same op on CUDA (liger-kernel's, else fla's), when installed.
- `auto`: `fused` on CUDA where one is installed, else `chunked`.

Matmuls run in the autocast dtype (as `lm_head` does under autocast), the softmax in float32 (or
float64 for float64 inputs), exactly as `lm_loss(lm_head(h))` does.

Under tensor parallelism the head's weight is sharded over the vocabulary: `chunked` then runs
vocabulary-parallel (each rank its shard's logits of a chunk; the softmax's max and sum, the
target's logit and the hidden states' gradient summed over the tensor-parallel group, as
Megatron's vocabulary-parallel cross-entropy), and `auto` is `chunked` there (the fused kernels
hold the whole vocabulary). Under pipeline parallelism the last stage applies the chunked or
fused loss to its microbatch inside its forward (`parallel.pipeline.StageModule`), the same way.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate

from common.imports import optional_attribute

IGNORE_INDEX = -100  # pretrain.loss.IGNORE_INDEX (not imported: loss.py imports torch.distributed)
LOSSES = ("auto", "full", "chunked", "fused")  # `train.loss` names
CHUNK_ELEMENTS = 1 << 25  # logits per chunk (128 MiB in float32): 256 tokens at a 128k vocabulary

HeadLoss = Callable[[Tensor, Tensor, Tensor], Tensor]  # (hidden [..., d], head weight [V, d], labels [...]) -> summed loss


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device) and weight.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _summed(value: Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
    """`value` reduced over the tensor-parallel group in place (unchanged without one)."""
    if group is not None:
        dist.all_reduce(value, op=op, group=group)
    return value


def _logsumexp(logits: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """logsumexp over the vocabulary, whose shards the group's ranks hold."""
    if group is None:
        return torch.logsumexp(logits, dim=-1)
    top = _summed(logits.amax(dim=-1), group, dist.ReduceOp.MAX)
    return _summed((logits - top[:, None]).exp().sum(dim=-1), group).log() + top


def chunk_loss_and_grads(
    h: Tensor, w: Tensor, y: Tensor, ignore_index: int, vocab_start: int, group: dist.ProcessGroup | None,
    want_hidden: bool, want_weight: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One chunk's summed cross-entropy, and the gradients of its hidden states `h` and of the
    weight `w` (rows [vocab_start, vocab_start + len(w)) of the vocabulary), in float32 at least."""
    acc = torch.promote_types(w.dtype, torch.float32)  # the softmax's precision
    logits = (h @ w.t()).to(acc)  # rounded to w's dtype first, as lm_head's output is
    lse = _logsumexp(logits, group)
    valid = y != ignore_index
    mine = valid & (y >= vocab_start) & (y < vocab_start + w.shape[0])  # the target's row is here
    target = torch.where(mine, y - vocab_start, 0)
    picked = _summed(torch.where(mine, logits.gather(1, target[:, None]).squeeze(1), 0), group)
    loss = torch.where(valid, lse - picked, 0).sum()
    if not (want_hidden or want_weight):
        return loss, None, None
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    grad.scatter_add_(1, target[:, None], -mine[:, None].to(acc))
    grad = grad.mul_(valid[:, None]).to(w.dtype)
    grad_h = _summed((grad @ w).to(acc), group) if want_hidden else None
    grad_w = (grad.t() @ h).to(acc) if want_weight else None
    return loss, grad_h, grad_w


ChunkFn = Callable[..., tuple[Tensor, Tensor | None, Tensor | None]]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """`weight` is the vocabulary's rows [vocab_start, vocab_start + len(weight)); with `group` the
    other rows are on the group's other ranks and every rank holds the same hidden states."""

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int, dtype: torch.dtype, ignore_index: int,
        vocab_start: int = 0, group: dist.ProcessGroup | None = None, chunk_fn: ChunkFn = chunk_loss_and_grads,
    ) -> Tensor:
        acc = torch.promote_types(dtype, torch.float32)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_weight else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(dtype)
            loss, grad_h, grad_w = chunk_fn(h, w, labels[start : start + chunk], ignore_index, vocab_start, group, want_hidden, want_weight)
            total = total + loss
            if grad_h is not None:
                grad_hidden[start : start + chunk] = grad_h.to(hidden.dtype)
            if grad_w is not None:
                grad_weight += grad_w
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, reduction: str = "sum", chunk_tokens: int | None = None,
    ignore_index: int = IGNORE_INDEX, chunk_fn: ChunkFn = chunk_loss_and_grads,
) -> Tensor:
    """cross_entropy(hidden @ weight.T, labels) summed (or averaged over the valid labels), in
    float32 at least, holding one chunk of `chunk_tokens` tokens' logits at a time. A `weight`
    sharded over the vocabulary (a DTensor, Shard(0), under tensor parallelism) runs
    vocabulary-parallel over its mesh, the hidden states gathered to every rank first."""
    group, vocab_start = None, 0
    if isinstance(weight, DTensor):
        group, vocab_start = weight.device_mesh.get_group(), weight.device_mesh.get_local_rank() * weight.to_local().shape[0]
        hidden = hidden.redistribute(placements=[Replicate()]).to_local() if isinstance(hidden, DTensor) else hidden
        weight = weight.to_local()
    hidden2d, labels1d = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    dtype = _compute_dtype(hidden, weight)
    total = _ChunkedLinearCrossEntropy.apply(hidden2d, weight, labels1d, chunk, dtype, ignore_index, vocab_start, group, chunk_fn)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (labels1d != ignore_index).sum().clamp(min=1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


# The fused linear cross-entropies ebb can use, in order of preference (measured: README, Loss):
# name -> (module, class, options). liger accumulates the head's weight gradient over its chunks
# in float32 (by default in the weight's bf16).
FUSED_KERNELS = {
    "liger-kernel": ("liger_kernel.transformers.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyLoss", {"accum_dtype": torch.float32}),
    "fla": ("fla.modules.fused_linear_cross_entropy", "FusedLinearCrossEntropyLoss", {}),
}
AUTO_FUSED_KERNEL = "liger-kernel"  # what `auto` takes where installed: fla's measured slower than the chunked loss


@functools.cache
def fused_kernel(only: str | None = None) -> tuple[str, Callable[[], Callable]] | None:
    """(name, factory of a summed-loss module) of the first installed fused linear cross-entropy
    of `FUSED_KERNELS` (or of `only`); None when none imports (they need Triton)."""
    for name, (module, cls, options) in FUSED_KERNELS.items():
        if only not in (None, name):
            continue
        if (factory := optional_attribute(module, cls)) is not None:
            return name, functools.partial(factory, ignore_index=IGNORE_INDEX, reduction="sum", **options)
    return None


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, kernel: str | None = None) -> Tensor:
    """The installed fused kernel (`fused_kernel(kernel)`) on CUDA tensors, summed over the tokens.
    Meta tensors (shapes only: a pipeline stage's metadata inference in torch before 2.13 runs the
    stage on them) take the chunked form, as no Triton kernel runs there."""
    if hidden.is_meta:
        return chunked_linear_cross_entropy(hidden, weight, labels)
    found = fused_kernel(kernel)
    if found is None:
        raise RuntimeError("no fused linear cross-entropy installed (pip install liger-kernel, or flash-linear-attention)")
    name = found[0]
    module = _fused_module(name)
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    dtype = _compute_dtype(hidden, weight)
    h, w = h.to(dtype), weight.to(dtype)
    return module(w, h, y) if name == "liger-kernel" else module(h, y, w)


@functools.cache
def _fused_module(name: str):
    return fused_kernel(name)[1]()


def resolve_loss(name: str, device: torch.device | str, shape: dict[str, int] | None = None) -> tuple[str, str | None]:
    """The loss a run uses for `train.loss = name` on `device` and layout `shape`, and the warning
    line to print when that is not what was asked for (None when it is)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (one of {', '.join(LOSSES)})")
    shape = shape or {}
    if name == "full":
        return "full", None
    if shape.get("tp", 1) > 1:
        why = "the fused kernels hold the whole vocabulary; chunked runs vocabulary-parallel"
        return "chunked", f"ebb: warning: train.loss=fused falls back to chunked with parallel.tp > 1 ({why})" if name == "fused" else None
    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return ("fused" if on_cuda and fused_kernel(AUTO_FUSED_KERNEL) else "chunked"), None
    fused = fused_kernel() if on_cuda else None
    if name == "fused" and fused is None:
        why = "not on CUDA" if not on_cuda else "neither liger-kernel nor fla imports"
        return "chunked", f"ebb: warning: train.loss=fused falls back to chunked ({why})"
    return name, None


@functools.cache
def compiled_chunk() -> ChunkFn:
    """`chunk_loss_and_grads` through torch.compile: one graph for every chunk (the loop stays
    eager: compiled whole, it would be unrolled, chunk by chunk)."""
    return torch.compile(chunk_loss_and_grads)


def head_loss(name: str, compiled: bool = False) -> HeadLoss | None:
    """What the model applies to its normed hidden states and head weight instead of logits, for a
    resolved loss name (`compiled`: the chunked loss's chunk compiled, where no tensor-parallel
    collective runs inside it); None for `full` (the model returns logits)."""
    if name == "chunked":
        chunk_fn = compiled_chunk() if compiled else chunk_loss_and_grads
        return lambda hidden, weight, labels: chunked_linear_cross_entropy(hidden, weight, labels, chunk_fn=chunk_fn)
    if name == "fused":
        return fused_linear_cross_entropy
    return None


def describe(name: str) -> str:
    """The header's words for a resolved loss."""
    if name == "fused":
        return f"fused ({fused_kernel()[0]})"
    if name == "chunked":
        return f"chunked (<= {CHUNK_ELEMENTS:,} logits at a time)"
    return "full logits"


