"""Tensor parallelism for RWKV-7 (with its channel-mix and value residual), MoM and SSE: TP=2 on
gloo, training without and with sequence parallelism, and decoding, against one process with the same seed (the
harness and tolerances of tests/tp_parity.py), except the final parameters: atol 1e-4, a
thirtieth of the learning rate, since AdamW's m / sqrt(v) turns the float32 rounding difference
of an element whose gradient is near zero into up to a whole step."""
from __future__ import annotations

import pytest

from tests.conftest import TP2_MIXERS, tiny_model_config
from tests.tp_parity import VOCAB, TPRun, assert_tp_decoding_matches_single_process, assert_tp_matches_single_process

PARAMS_ATOL = 1e-4
pytestmark = pytest.mark.distributed

ROUTED = dict(
    rwkv7=dict(head_dim=8, decay_rank=8, a_rank=8, v_rank=8, gate_rank=8, channel_mix_hidden=64, chunk_size=8),
    mom=dict(num_memories=3, topk=2, num_heads=2, head_dim=8, chunk_size=8),
    sse=dict(num_partitions=3, topk=2, num_heads=2, head_dim=8, lora_rank=4, use_short_conv=True, chunk_size=8),
)
CONFIG = tiny_model_config("R*ROS", vocab_size=VOCAB, mlp_hidden=64, mixers=TP2_MIXERS | ROUTED)


def test_tp2_matches_single_process() -> None:
    """R blocks (the second reads the first's carry["v_first"] across an attention block) and
    MoM and SSE (varlen; with short convs and their aux losses)."""
    runs = [TPRun(CONFIG, sequence_parallel=False), TPRun(CONFIG, sequence_parallel=True)]
    assert_tp_matches_single_process(runs, PARAMS_ATOL)


def test_tp2_decoding_matches_single_process() -> None:
    """RWKV-7's shift and state, every memory's and partition's state and conv tails, per rank."""
    assert_tp_decoding_matches_single_process(CONFIG)
