"""Tensor parallelism for RWKV-7 (with its channel-mix and value residual), MoM and SSE: TP=2 on
gloo, training without and with sequence parallelism, and decoding, against one process with the same seed (the
harness and tolerances of test_tensor_parallel), except the final parameters: atol 1e-4, a
thirtieth of the learning rate, since AdamW's m / sqrt(v) turns the float32 rounding difference
of an element whose gradient is near zero into up to a whole step."""
from __future__ import annotations

from models.config import ModelConfig
from tests.parallel.test_tensor_parallel import VOCAB, Run, assert_tp_decoding_matches_single_process, assert_tp_matches_single_process

PARAMS_ATOL = 1e-4

MIXERS = dict(
    attention=dict(num_heads=4, num_kv_heads=2),
    rwkv7=dict(head_dim=8, decay_rank=8, a_rank=8, v_rank=8, gate_rank=8, channel_mix_hidden=64, chunk_size=8),
    mom=dict(num_memories=3, topk=2, num_heads=2, head_dim=8, chunk_size=8),
    sse=dict(num_partitions=3, topk=2, num_heads=2, head_dim=8, lora_rank=4, use_short_conv=True, chunk_size=8),
)
CONFIG = ModelConfig(pattern="R*ROS", d_model=32, vocab_size=VOCAB, mlp_hidden=64, mixers=MIXERS)


def test_tp2_matches_single_process() -> None:
    """R blocks (the second reads the first's carry["v_first"] across an attention block) and
    MoM and SSE (varlen; with short convs and their aux losses)."""
    runs = [Run((), sequence_parallel=False, base=CONFIG), Run((), sequence_parallel=True, base=CONFIG)]
    assert_tp_matches_single_process(runs, PARAMS_ATOL)


def test_tp2_decoding_matches_single_process() -> None:
    """RWKV-7's shift and state, every memory's and partition's state and conv tails, per rank."""
    assert_tp_decoding_matches_single_process(CONFIG)
