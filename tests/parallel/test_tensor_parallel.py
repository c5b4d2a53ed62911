"""Tensor parallelism: TP=2 on gloo (with and without sequence parallelism) against one process
with the same seed, for a model with every mixer that has a TP plan (the harness and tolerances:
tests/tp_parity.py); layout errors in process."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from torch.distributed.tensor import Replicate

from models.config import ModelConfig
from models.mixers import SPECS
from models.model import HybridLM
from parallel.config import ParallelConfig
from parallel.mesh import ParallelError, mesh_shape, validate_layout
from parallel.tp import layer_styles
from tests.conftest import TP2_MIXERS, every_mixer, tiny_model_config
from tests.tp_parity import VOCAB, TPRun, assert_tp_decoding_matches_single_process, assert_tp_matches_single_process

CONFIG = tiny_model_config("M*TG", vocab_size=VOCAB, mlp_hidden=64, mixers=TP2_MIXERS)
RUNS = [
    TPRun(CONFIG, sequence_parallel=False),
    TPRun(CONFIG, sequence_parallel=True),
    TPRun(CONFIG.model_copy(update=dict(tie_embeddings=False)), sequence_parallel=True, checkpointed=True),
    TPRun(CONFIG.model_copy(update=dict(mlp="none")), sequence_parallel=True),
]


def test_every_mixer_and_mlp_declares_a_plan_that_places_every_parameter() -> None:
    for block in HybridLM(tiny_model_config(every_mixer(), mixers=TP2_MIXERS)).blocks:
        for layer in (block.mixer, block.mlp):
            assert layer_styles(layer, Replicate()), type(layer).__name__
    with pytest.raises(NotImplementedError, match=r"RMSNorm declares no tensor-parallel plan"):
        layer_styles(block.mixer_norm, Replicate())


def test_a_plan_that_misses_a_parameter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    mixer = HybridLM(CONFIG).blocks[0].mixer
    plan = type(mixer).tp_plan
    monkeypatch.setattr(type(mixer), "tp_plan", dataclasses.replace(plan, colwise=plan.colwise[1:]))
    with pytest.raises(ValueError, match=r"tensor-parallel plan does not place"):
        layer_styles(mixer, Replicate())


@pytest.mark.distributed
def test_tp2_matches_single_process() -> None:
    """Tied embeddings without and with sequence parallelism; with SP, untied under activation
    checkpointing, and mixer-only blocks (mlp: none)."""
    assert_tp_matches_single_process(RUNS)


def with_mixers(pattern: str, **changes: dict[str, Any]) -> ModelConfig:
    mixers = {name: {**TP2_MIXERS.get(name, {}), **changes.get(name, {})} for name in TP2_MIXERS | changes}
    return tiny_model_config(pattern, vocab_size=VOCAB, mlp_hidden=64, mixers=mixers)


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
         r"RWKV-7 heads \(d_model / mixers.rwkv7.head_dim\) \(6\) must be divisible by parallel.tp \(4\)"),
        (dict(tp=4), ModelConfig(pattern="R", d_model=32, mixers=dict(rwkv7=dict(head_dim=8, channel_mix_hidden=34))), 4,
         r"mixers.rwkv7.channel_mix_hidden \(34\)"),
        (dict(tp=4), ModelConfig(pattern="O", d_model=32, mixers=dict(mom=dict(num_heads=2))), 4, r"mixers.mom.num_heads \(2\)"),
        (dict(tp=4), ModelConfig(pattern="S", d_model=32, mixers=dict(sse=dict(num_heads=6))), 4, r"mixers.sse.num_heads \(6\)"),
        (dict(tp=4), with_mixers("P", gated_deltaproduct=dict(num_heads=2)), 4, r"mixers.gated_deltaproduct.num_heads \(2\)"),
        (dict(tp=2), CONFIG.model_copy(update=dict(mlp_hidden=65)), 2, r"MLP width \(65\)"),
        (dict(tp=2), CONFIG.model_copy(update=dict(vocab_size=65)), 2, r"model.vocab_size \(65\)"),
        (dict(pp=8, dp_shard=1), CONFIG, 8, r"4 blocks cannot fill parallel.pp = 8 pipeline stages"),
    ],
)
def test_invalid_layouts(parallel: dict, model: ModelConfig, world_size: int, message: str) -> None:
    with pytest.raises(ParallelError, match=message):
        validate_layout(ParallelConfig(**parallel), model, world_size)


def test_mixer_without_plan_is_a_layout_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SPECS["deltanet"].module, "tp_plan", None)
    with pytest.raises(ParallelError, match=r"mixer deltanet declares no tensor-parallel plan"):
        validate_layout(ParallelConfig(tp=2), CONFIG, 2)
    validate_layout(ParallelConfig(tp=1), CONFIG, 2)  # no plan needed without TP


def test_mesh_shape() -> None:
    assert mesh_shape(ParallelConfig(tp=2, pp=2), 8) == dict(pp=2, dp_replicate=1, dp_shard=2, cp=1, tp=2)
    assert validate_layout(ParallelConfig(tp=2, dp_replicate=2, dp_shard=1), CONFIG, 4) == dict(
        pp=1, dp_replicate=2, dp_shard=1, cp=1, tp=2
    )


@pytest.mark.distributed
def test_tp2_decoding_matches_single_process() -> None:
    """On build_mesh's 5-dim mesh."""
    assert_tp_decoding_matches_single_process(CONFIG)
