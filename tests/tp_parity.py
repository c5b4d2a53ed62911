"""Tensor parallelism over 2 gloo ranks against one process with the same seed: training (both by
the production step, tests/parity.py) and decoding. Shared by the TP test files.

Tolerance: float32; logits, gradients and parameters after 3 AdamW steps within atol 2e-5 / rtol
1e-4, losses within 2e-5 (the same computation, split over heads: only the order of the sums over
heads and vocabulary shards differs)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from models.config import ModelConfig
from models.model import HybridLM
from parallel.config import ParallelConfig
from parallel.data_parallel import apply_activation_checkpointing
from parallel.mesh import build_mesh
from parallel.tp import apply_tensor_parallel
from pretrain.loss import IGNORE_INDEX
from pretrain.parallelize import Parallel
from tests.distributed import run_distributed
from tests.parity import full, layout, train_steps

TP, STEPS, BATCH, SEQ, VOCAB = 2, 3, 2, 16, 64
ATOL, RTOL, LOSS_TOL = 2e-5, 1e-4, 2e-5


@dataclass
class Rows:
    """A batch as `train_step` takes it, where `cu_seqlens` may be None (each row one sequence),
    which the loader never makes but the model takes."""

    input_ids: Tensor
    labels: Tensor
    cu_seqlens: Tensor | None

    def to(self, device: torch.device | str) -> Rows:
        return Rows(self.input_ids.to(device), self.labels.to(device), None if self.cu_seqlens is None else self.cu_seqlens.to(device))


def batches() -> list[Rows]:
    """Some labels ignored; the first batch packs documents."""
    g = torch.Generator().manual_seed(1)
    out = []
    for step in range(STEPS):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[:, :3] = IGNORE_INDEX
        out.append(Rows(ids[:, :-1], labels, torch.tensor([0, 5, 11, 21]) if step == 0 else None))
    return out


def named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameter names as in the state dict (without activation-checkpoint wrappers' prefix)."""
    return ((n.replace("_checkpoint_wrapped_module.", ""), p) for n, p in model.named_parameters())


class Trained(NamedTuple):
    """As plain tensors (DTensors gathered): the first step's logits and gradients, every step's
    LM loss, auxiliary loss (none without routed mixers) and gradient norm before clipping, and
    the final parameters."""

    logits: Tensor
    grads: dict[str, Tensor]
    losses: list[float]
    aux_losses: list[float]
    norms: list[float]
    params: dict[str, Tensor]


def train(model: nn.Module, tp: int) -> Trained:
    """`STEPS` steps of the production step, on this rank of `tp` (1: one process). Hooks catch
    the first forward's logits and each parameter's first gradient (before clipping)."""
    logits: list[Tensor] = []
    grads: dict[str, Tensor] = {}

    def catch_grad(name: str) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            if name not in grads:
                grads[name] = param.grad.detach().clone()

        return hook

    def catch_logits(module: nn.Module, args: tuple, output: Tensor) -> None:
        logits.append(output.detach())

    hooks = [model.register_forward_hook(catch_logits)]
    hooks += [p.register_post_accumulate_grad_hook(catch_grad(n)) for n, p in named_parameters(model)]
    results = train_steps(Parallel(layout(tp=tp), module=model), [[batch] for batch in batches()])
    for hook in hooks:
        hook.remove()
    return Trained(
        full(logits[0]), {n: full(g) for n, g in grads.items()},
        [r.loss.item() for r in results], [r.aux_loss.item() for r in results if r.aux_loss is not None],
        [r.grad_norm.item() for r in results], {n: full(p).detach() for n, p in named_parameters(model)},
    )


class TPRun(NamedTuple):
    config: ModelConfig
    sequence_parallel: bool
    checkpointed: bool = False  # activation checkpointing, applied before TP (the harder order)


def tensor_parallel_rank(runs: list[TPRun]) -> list[Trained]:
    mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    results = []
    for run in runs:
        torch.manual_seed(0)
        model = HybridLM(run.config)
        if run.checkpointed:
            apply_activation_checkpointing(model, "full")
        apply_tensor_parallel(model, mesh, sequence_parallel=run.sequence_parallel)
        assert all(isinstance(p, DTensor) for p in model.parameters()), "every parameter is a DTensor"
        results.append(train(model, TP))
    return results


def single_process(cfg: ModelConfig) -> Trained:
    """What `train` gives in one process (the same parameter layout as TP's gathered one)."""
    torch.manual_seed(0)
    return train(HybridLM(cfg), 1)


def assert_close_dicts(got: dict[str, Tensor], want: dict[str, Tensor], atol: float = ATOL) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def assert_tp_matches_single_process(runs: list[TPRun], params_atol: float = ATOL) -> None:
    """Logits, per-parameter gradients, 3 clipped AdamW steps' losses, auxiliary losses, gradient
    norms and final parameters (within `params_atol`) of every run under TP=2 equal one process's
    (runs of the same model config share one single-process reference)."""
    want = {run.config.model_dump_json(): single_process(run.config) for run in runs}
    for rank in run_distributed(tensor_parallel_rank, TP, runs):
        for run, got in zip(runs, rank):
            print(run)  # shown on failure
            reference = want[run.config.model_dump_json()]
            torch.testing.assert_close(got.logits, reference.logits, atol=ATOL, rtol=RTOL)
            assert_close_dicts(got.grads, reference.grads)
            assert got.losses == pytest.approx(reference.losses, abs=LOSS_TOL)
            assert got.aux_losses == pytest.approx(reference.aux_losses, abs=LOSS_TOL)
            assert got.norms == pytest.approx(reference.norms, rel=RTOL)
            assert_close_dicts(got.params, reference.params, params_atol)


def decode_rank(cfg: ModelConfig, input_ids: Tensor, prefill: int) -> Tensor:
    mesh = build_mesh(ParallelConfig(tp=TP), TP, "cpu")
    assert mesh.mesh_dim_names == ("pp", "dp_replicate", "dp_shard", "cp", "tp") and mesh.shape == (1, 1, 1, 1, TP)
    torch.manual_seed(0)
    model = apply_tensor_parallel(HybridLM(cfg), mesh["tp"], loss_parallel=False)
    cache = model.new_cache()
    with torch.no_grad():
        logits = [model(input_ids[:, :prefill], cache=cache)]
        logits += [model(input_ids[:, t : t + 1], cache=cache) for t in range(prefill, input_ids.shape[1])]
    return torch.cat(logits, dim=1)


def assert_tp_decoding_matches_single_process(cfg: ModelConfig) -> None:
    """Prefill then token-by-token decoding from each rank's cache of its own heads, with gathered
    (plain) logits, equals one process's full forward."""
    torch.manual_seed(0)
    reference = HybridLM(cfg)
    input_ids = torch.randint(0, VOCAB, (BATCH, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = reference(input_ids)
    for got in run_distributed(decode_rank, TP, cfg, input_ids, 8):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
