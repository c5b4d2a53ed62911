"""The chunked linear cross-entropy with the head sharded over the vocabulary (tensor
parallelism, 2 real gloo processes) gives one process's full-logits cross-entropy, its loss and
the gradients of the hidden states and of the whole head, to float64 rounding: targets on either
shard, ignored labels, chunks that cut the tokens unevenly, hidden states replicated or sharded
over the sequence (sequence parallelism)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from pretrain.linear_ce import IGNORE_INDEX, chunked_linear_cross_entropy
from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed
VOCAB, D, B, T = 12, 5, 3, 8


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    labels[0, :3] = IGNORE_INDEX
    labels[1, 0], labels[1, 1] = 0, VOCAB - 1  # a target on each rank's shard
    return hidden, weight, labels


def reference() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden, weight, labels = (t.requires_grad_() if t.is_floating_point() else t for t in inputs())
    loss = F.cross_entropy((hidden @ weight.t()).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def vocab_parallel_rank(sequence_parallel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    hidden, weight, labels = inputs()
    head = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    hidden = distribute_tensor(hidden, mesh, [Shard(1)]).requires_grad_() if sequence_parallel else hidden.requires_grad_()
    loss = chunked_linear_cross_entropy(hidden, head, labels, chunk_tokens=5)
    loss.backward()
    grad_hidden = hidden.grad.full_tensor() if isinstance(hidden, DTensor) else hidden.grad
    return loss.detach(), grad_hidden, head.grad.full_tensor()


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["replicated-hidden", "sequence-parallel"])
def test_vocab_parallel_chunked_loss_is_the_full_cross_entropy(sequence_parallel: bool) -> None:
    want = reference()
    for got in run_distributed(vocab_parallel_rank, 2, sequence_parallel):
        for name, g, w in zip(("loss", "grad hidden", "grad head"), got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)
