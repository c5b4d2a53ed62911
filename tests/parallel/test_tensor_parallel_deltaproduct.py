"""Tensor parallelism for Gated DeltaProduct (`P`): TP=2 on gloo, training without and with
sequence parallelism, and decoding, against one process with the same seed (the harness and
tolerances of test_tensor_parallel). Its k, v and beta projections are n_h times as wide and
stored head-major, so each rank's colwise rows must be whole heads with all their steps: with
n_h = 3 a step-major layout would hand a rank steps of other heads and fail here."""
from __future__ import annotations

import pytest

from models.config import ModelConfig
from parallel.mesh import ParallelError, validate_layout
from pretrain.config import ParallelConfig
from tests.parallel.test_tensor_parallel import VOCAB, Run, assert_tp_decoding_matches_single_process, assert_tp_matches_single_process

MIXERS = dict(
    attention=dict(num_heads=4, num_kv_heads=2),
    gated_deltaproduct=dict(num_heads=2, num_v_heads=4, head_dim=8, expand_v=1.0, num_householder=3, chunk_size=8),
)
CONFIG = ModelConfig(pattern="P*P", d_model=32, vocab_size=VOCAB, mlp_hidden=64, mixers=MIXERS)


def test_tp2_matches_single_process() -> None:
    """Packed documents in the first batch (cu_seqlens * n_h on the expanded sequence), GVA."""
    assert_tp_matches_single_process([Run((), sequence_parallel=False, base=CONFIG), Run((), sequence_parallel=True, base=CONFIG)])


def test_tp2_decoding_matches_single_process() -> None:
    """Each rank's state and n_h-wide conv tails of its own heads."""
    assert_tp_decoding_matches_single_process(CONFIG)


def test_num_heads_must_divide_by_tp() -> None:
    with pytest.raises(ParallelError, match=r"mixers.gated_deltaproduct.num_heads \(2\) must be divisible by parallel.tp \(4\)"):
        validate_layout(ParallelConfig(tp=4), CONFIG, 4)
