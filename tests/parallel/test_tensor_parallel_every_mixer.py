"""Tensor parallelism for every registered mixer: TP=2 on gloo, training without and with
sequence parallelism, and decoding, against one process with the same seed (the harness and
tolerances of tests/tp_parity.py), except the final parameters: atol 1e-4, a thirtieth of the
learning rate, since AdamW's m / sqrt(v) turns the float32 rounding difference of an element whose
gradient is near zero into up to a whole step.

Every mixer appears twice, so a later block reads what an earlier one wrote into the carry (RWKV-7's
value residual); the routed mixers add their aux losses. Gated DeltaProduct runs n_h = 3 with
grouped value heads: its k, v and beta rows are stored head-major, so each rank's colwise rows are
whole heads with all their steps (a step-major layout would fail here)."""
from __future__ import annotations

import pytest

from tests.conftest import TP2_MIXERS, every_mixer, tiny_model_config
from tests.tp_parity import VOCAB, TPRun, assert_tp_decoding_matches_single_process, assert_tp_matches_single_process

PARAMS_ATOL = 1e-4
pytestmark = pytest.mark.distributed

OPTIONS = dict(
    rwkv7=dict(head_dim=8, decay_rank=8, a_rank=8, v_rank=8, gate_rank=8, channel_mix_hidden=64, chunk_size=8),
    mom=dict(num_memories=3, topk=2, num_heads=2, head_dim=8, chunk_size=8),
    sse=dict(num_partitions=3, topk=2, num_heads=2, head_dim=8, lora_rank=4, use_short_conv=True, chunk_size=8),
    gated_deltaproduct=dict(num_householder=3, num_v_heads=4, expand_v=1.0, chunk_size=8),
)
CONFIG = tiny_model_config(every_mixer(2), vocab_size=VOCAB, mlp_hidden=64, mixers=TP2_MIXERS | OPTIONS)


def test_tp2_matches_single_process() -> None:
    """Packed documents in the first batch; without and with sequence parallelism."""
    runs = [TPRun(CONFIG, sequence_parallel=False), TPRun(CONFIG, sequence_parallel=True)]
    assert_tp_matches_single_process(runs, PARAMS_ATOL)


def test_tp2_decoding_matches_single_process() -> None:
    """Every mixer's states, conv tails, shifts and KV caches, per rank."""
    assert_tp_decoding_matches_single_process(CONFIG)
