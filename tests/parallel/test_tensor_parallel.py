"""Tensor parallelism: TP=2 on gloo (with and without sequence parallelism) against one process
with the same seed, for a model with every mixer that has a TP plan; layout errors in process.

Tolerance: float32; logits, gradients and parameters after 3 AdamW steps within atol 2e-5 /
rtol 1e-4, losses within 2e-5 (the same computation, split over heads: only the order of the
sums over heads and vocabulary shards differs)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from models.config import ModelConfig
from models.model import HybridLM
from optim.adamw import build_optimizer
from parallel.data_parallel import apply_activation_checkpointing
from parallel.mesh import ParallelError, build_mesh, mesh_shape, validate_layout
from parallel.tp import TP_PLANS, apply_tensor_parallel, mixer_plan
from pretrain.config import OptimConfig, ParallelConfig
from pretrain.loss import IGNORE_INDEX, add_aux_loss, lm_loss
from tests.distributed import run_distributed

TP, STEPS, BATCH, SEQ, VOCAB = 2, 3, 2, 16, 64
OPTIM = OptimConfig(lr=3e-3, weight_decay=0.1, fused=False)
GRAD_CLIP = 0.5
ATOL, RTOL, LOSS_TOL = 2e-5, 1e-4, 2e-5
MIXERS = dict(
    attention=dict(num_heads=4, num_kv_heads=2),
    mamba2=dict(d_state=8, head_dim=8, n_groups=2, chunk_size=8),
    deltanet=dict(num_heads=2),
    gated_deltanet=dict(num_heads=2, num_v_heads=4, head_dim=8, expand_v=1.0),
)
CONFIG = ModelConfig(pattern="M*TG", d_model=32, vocab_size=VOCAB, mlp_hidden=64, mixers=MIXERS)


def batches() -> list[tuple[Tensor, Tensor, Tensor | None]]:
    """Input ids, labels (some ignored) and document starts; the first batch packs documents."""
    g = torch.Generator().manual_seed(1)
    out = []
    for step in range(STEPS):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[:, :3] = IGNORE_INDEX
        cu_seqlens = torch.tensor([0, 5, 11, 21]) if step == 0 else None
        out.append((ids[:, :-1], labels, cu_seqlens))
    return out


def full(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameter names as in the state dict (without activation-checkpoint wrappers' prefix)."""
    return ((n.replace("_checkpoint_wrapped_module.", ""), p) for n, p in model.named_parameters())


def train(model: nn.Module) -> tuple[Tensor, dict[str, Tensor], list[float], list[float], dict[str, Tensor]]:
    """First-step logits and gradients, every step's loss (with the mixers' auxiliary losses, as
    the train step adds them) and gradient norm (clipped as the train
    step clips) and the final parameters, as plain tensors (DTensors gathered)."""
    optimizer = build_optimizer(model, OPTIM)
    losses, norms, logits0, grads0 = [], [], None, None
    for input_ids, labels, cu_seqlens in batches():
        carry: dict[str, Tensor] = {}
        logits = model(input_ids, cu_seqlens=cu_seqlens, carry=carry)
        with loss_parallel():
            loss = lm_loss(logits, labels)
            if "aux_loss" in carry:
                loss = add_aux_loss(loss, carry["aux_loss"])
            loss.backward()
        if logits0 is None:
            logits0 = full(logits).detach()
            grads0 = {n: full(p.grad).clone() for n, p in named_parameters(model)}
        losses.append(full(loss).item())
        norms.append(full(nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)).item())
        optimizer.step()
        optimizer.zero_grad()
    return logits0, grads0, losses, norms, {n: full(p).detach() for n, p in named_parameters(model)}


class Run(NamedTuple):
    model: tuple[tuple[str, object], ...]  # ModelConfig changes
    sequence_parallel: bool
    checkpointed: bool = False  # activation checkpointing, applied before TP (the harder order)
    base: ModelConfig = CONFIG

    def config(self) -> ModelConfig:
        return self.base.model_copy(update=dict(self.model))


RUNS = [
    Run((), sequence_parallel=False),
    Run((), sequence_parallel=True),
    Run((("tie_embeddings", False),), sequence_parallel=True, checkpointed=True),
    Run((("mlp", "none"),), sequence_parallel=True),
]


def tensor_parallel_rank(runs: list[Run]) -> list:
    mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    results = []
    for run in runs:
        torch.manual_seed(0)
        model = HybridLM(run.config())
        if run.checkpointed:
            apply_activation_checkpointing(model, "full")
        apply_tensor_parallel(model, mesh, sequence_parallel=run.sequence_parallel)
        assert all(isinstance(p, DTensor) for p in model.parameters()), "every parameter is a DTensor"
        results.append(train(model))
    return results


def assert_close_dicts(got: dict[str, Tensor], want: dict[str, Tensor], atol: float = ATOL) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def test_covered_mixers() -> None:
    assert set(TP_PLANS) == {"*", "M", "T", "G", "R", "O", "S"}
    with pytest.raises(NotImplementedError, match=r"mixer 'X' has no tensor-parallel plan"):
        mixer_plan("X")


def single_process(cfg: ModelConfig) -> tuple:
    """What `train` gives in one process (the same parameter layout as TP's gathered one)."""
    torch.manual_seed(0)
    return train(HybridLM(cfg))


def assert_tp_matches_single_process(runs: list[Run], params_atol: float = ATOL) -> None:
    """Logits, per-parameter gradients, 3 clipped AdamW steps' losses, gradient norms and final
    parameters (within `params_atol`) of every run under TP=2 equal one process's (runs with the
    same model changes share one single-process reference)."""
    want = {run.model: single_process(run.config()) for run in runs}
    for rank in run_distributed(tensor_parallel_rank, TP, runs):
        for run, (logits, grads, losses, norms, params) in zip(runs, rank):
            print(run)  # shown on failure
            want_logits, want_grads, want_losses, want_norms, want_params = want[run.model]
            torch.testing.assert_close(logits, want_logits, atol=ATOL, rtol=RTOL)
            assert_close_dicts(grads, want_grads)
            assert losses == pytest.approx(want_losses, abs=LOSS_TOL)
            assert norms == pytest.approx(want_norms, rel=RTOL)
            assert_close_dicts(params, want_params, params_atol)


def test_tp2_matches_single_process() -> None:
    """Tied embeddings without and with sequence parallelism; with SP, untied under activation
    checkpointing, and mixer-only blocks (mlp: none)."""
    assert_tp_matches_single_process(RUNS)


def with_mixers(pattern: str, **changes: dict) -> ModelConfig:
    mixers = {k: {**v, **changes.get(k, {})} for k, v in MIXERS.items()}
    return ModelConfig(pattern=pattern, d_model=32, vocab_size=VOCAB, mlp_hidden=64, mixers=mixers)


@pytest.mark.parametrize(
    "parallel, model, world_size, message",
    [
        (dict(tp=2, pp=2, dp_shard=1), CONFIG, 8, r"tp 2 = 4 processes, but the world size is 8"),
        (dict(tp=4), CONFIG, 6, r"world size 6 is not divisible by pp\*dp_replicate\*tp = 4"),
        (dict(tp=4), with_mixers("*", attention=dict(num_heads=6, head_dim=8, num_kv_heads=6)), 4,
         r"mixers.attention.num_heads \(6\) must be divisible by parallel.tp \(4\)"),
        (dict(tp=2), with_mixers("M*TG", attention=dict(num_kv_heads=1)), 2, r"mixers.attention.num_kv_heads \(1\)"),
        (dict(tp=2), with_mixers("M*TG", mamba2=dict(n_groups=1)), 2, r"mixers.mamba2.n_groups \(1\) must be divisible"),
        (dict(tp=4), with_mixers("T", deltanet=dict(num_heads=2)), 4, r"mixers.deltanet.num_heads \(2\)"),
        (dict(tp=4), with_mixers("G", gated_deltanet=dict(num_heads=2, num_v_heads=4)), 4, r"mixers.gated_deltanet.num_heads \(2\)"),
        (dict(tp=4), ModelConfig(pattern="R", d_model=48, mixers=dict(rwkv7=dict(head_dim=8))), 4,
         r"RWKV-7 heads \(d_model / mixers.rwkv7.head_dim = 6\) must be divisible by parallel.tp \(4\)"),
        (dict(tp=4), ModelConfig(pattern="R", d_model=32, mixers=dict(rwkv7=dict(head_dim=8, channel_mix_hidden=34))), 4,
         r"mixers.rwkv7.channel_mix_hidden \(34\)"),
        (dict(tp=4), ModelConfig(pattern="O", d_model=32, mixers=dict(mom=dict(num_heads=2))), 4, r"mixers.mom.num_heads \(2\)"),
        (dict(tp=4), ModelConfig(pattern="S", d_model=32, mixers=dict(sse=dict(num_heads=6))), 4, r"mixers.sse.num_heads \(6\)"),
        (dict(tp=2), CONFIG.model_copy(update=dict(mlp_hidden=65)), 2, r"MLP width \(65\)"),
        (dict(tp=2), CONFIG.model_copy(update=dict(vocab_size=65)), 2, r"model.vocab_size \(65\)"),
        (dict(pp=8, dp_shard=1), CONFIG, 8, r"4 blocks cannot fill parallel.pp = 8 pipeline stages"),
    ],
)
def test_invalid_layouts(parallel: dict, model: ModelConfig, world_size: int, message: str) -> None:
    with pytest.raises(ParallelError, match=message):
        validate_layout(ParallelConfig(**parallel), model, world_size)


def test_mixer_without_plan_is_a_layout_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(TP_PLANS, "T")
    with pytest.raises(ParallelError, match=r"mixer 'T' has no tensor-parallel plan"):
        validate_layout(ParallelConfig(tp=2), CONFIG, 2)
    validate_layout(ParallelConfig(tp=1), CONFIG, 2)  # no plan needed without TP


def test_mesh_shape() -> None:
    assert mesh_shape(ParallelConfig(tp=2, pp=2), 8) == dict(pp=2, dp_replicate=1, dp_shard=2, tp=2)
    assert validate_layout(ParallelConfig(tp=2, dp_replicate=2, dp_shard=1), CONFIG, 4) == dict(
        pp=1, dp_replicate=2, dp_shard=1, tp=2
    )


def decode_rank(cfg: ModelConfig, input_ids: Tensor, prefill: int) -> Tensor:
    mesh = build_mesh(ParallelConfig(tp=TP), TP, "cpu")
    assert mesh.mesh_dim_names == ("pp", "dp_replicate", "dp_shard", "tp") and mesh.shape == (1, 1, 1, TP)
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


def test_tp2_decoding_matches_single_process() -> None:
    """On build_mesh's 4-dim mesh."""
    assert_tp_decoding_matches_single_process(CONFIG)
