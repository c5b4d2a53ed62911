"""Context parallelism's piece summaries in one process, float64, against the step-by-step
references: one run of each chunked op from a zero state (v widened from [0 | I] for a matrix
transition; a plain run for Mamba2's scalar decay) gives, for any incoming state S_in, the
outputs (o + S_in^T reach) and the state handed on (combine(S_in, summary)) of the op run from
S_in; with packed documents only the first document sees S_in, and what a piece hands on is its
last document's state. Also how a batch is cut into pieces."""
from __future__ import annotations

import functools

import pytest
import torch

from models.context import Streams, cut_batch, read_incoming, summarise
from models.mixers.gated_deltaproduct import chunk_gated_delta_product
from models.ops import TORCH_OPS, recurrent_delta_rule, recurrent_gated_delta_rule, recurrent_rwkv7, recurrent_simple_gla
from tests.mixer_checks import assert_close64

B, T, H, K, V = 2, 11, 2, 4, 3


def inputs(op: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = rand(B, T, H, K), torch.nn.functional.normalize(rand(B, T, H, K), dim=-1), rand(B, T, H, V)
    gate, beta = -torch.rand(B, T, H, generator=g, dtype=torch.float64), torch.rand(B, T, H, generator=g, dtype=torch.float64)
    if op == "chunk_simple_gla":
        return dict(q=q, k=k, v=v, g=gate)
    if op == "chunk_delta_rule":
        return dict(q=q, k=k, v=v, beta=beta)
    if op == "chunk_gated_delta_rule":  # grouped value heads: one q/k head serves both value heads
        return dict(q=q[:, :, :1], k=k[:, :, :1], v=v, g=gate, beta=2 * beta)
    if op == "chunk_rwkv7":
        kappa = torch.nn.functional.normalize(rand(B, T, H, K), dim=-1)
        return dict(r=q, w=-torch.rand(B, T, H, K, generator=g, dtype=torch.float64), k=k, v=v, a=-kappa, b=kappa * torch.rand(B, T, H, K, generator=g, dtype=torch.float64))
    n = 3  # gated delta product: 3 steps per token
    return dict(q=q, k=torch.nn.functional.normalize(rand(B, T, n, H, K), dim=-1), v=rand(B, T, n, H, V), g=gate, beta=2 * torch.rand(B, T, n, H, generator=g, dtype=torch.float64))


def reference(op: str):
    """The step-by-step form (the product op runs the checked chunked gated delta rule from its state)."""
    return {
        "chunk_simple_gla": recurrent_simple_gla, "chunk_delta_rule": recurrent_delta_rule,
        "chunk_gated_delta_rule": lambda q, k, v, g, beta, **kw: recurrent_gated_delta_rule(
            q.repeat_interleave(H, 2), k.repeat_interleave(H, 2), v, g, beta, **kw),
        "chunk_rwkv7": recurrent_rwkv7,
        "chunk_gated_delta_product": functools.partial(chunk_gated_delta_product, chunk_size=4),
    }[op]


CASES = [("chunk_simple_gla", "matrix"), ("chunk_simple_gla", "decay"), ("chunk_delta_rule", "matrix"),
         ("chunk_gated_delta_rule", "matrix"), ("chunk_rwkv7", "matrix"), ("chunk_gated_delta_product", "matrix")]


@pytest.mark.parametrize("op, transition", CASES)
@pytest.mark.parametrize("packed", [False, True])
def test_one_zero_start_run_summarises_a_piece(op: str, transition: str, packed: bool) -> None:
    g = torch.Generator().manual_seed(0)
    args = inputs(op, g)
    chunked = TORCH_OPS.get(op, chunk_gated_delta_product)
    scale = 0.7
    incoming = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    if packed:  # rows flattened into documents [0, 5) [5, 11) | [11, 12) [12, 22): rows 0 and 1 enter
        args = {n: t.reshape(1, B * T, *t.shape[2:]) for n, t in args.items()}
        cu_seqlens = torch.tensor([0, 5, 11, 12, 22])
        streams = Streams(enter=torch.tensor([0, -1, 1, -1]), leave=torch.tensor([1, 3]))
        initial = torch.stack([incoming[0], torch.zeros_like(incoming[0]), incoming[1], torch.zeros_like(incoming[0])])
    else:
        cu_seqlens, streams, initial = None, Streams(enter=torch.arange(B), leave=torch.arange(B)), incoming
    run = functools.partial(chunked, scale=scale, output_final_state=True, cu_seqlens=cu_seqlens, chunk_size=4)
    ran = summarise(transition, run, args, streams, cu_seqlens, scale)
    expected_o, expected_final = reference(op)(**args, scale=scale, initial_state=initial, output_final_state=True, cu_seqlens=cu_seqlens)
    assert_close64(ran.output + read_incoming(ran.reach, incoming, streams, cu_seqlens), expected_o)
    assert_close64(ran.combine(incoming, ran.summary), expected_final[streams.leave])
    assert (read_incoming(ran.reach, incoming, streams, cu_seqlens)).abs().max() > 1e-3  # the incoming state matters


def test_cut_batch_gives_each_rank_its_piece_of_every_row() -> None:
    ids = torch.arange(2 * 8).view(2, 8)
    cu_seqlens = torch.tensor([0, 3, 10, 16])  # rows [0, 3) [3, 8) | [8, 10) [10, 16)
    pieces = [cut_batch(ids, ids + 1, cu_seqlens, rank, 2) for rank in range(2)]
    assert torch.equal(pieces[1][0], torch.tensor([[4, 5, 6, 7], [12, 13, 14, 15]]))
    assert torch.equal(pieces[1][1], pieces[1][0] + 1)
    assert pieces[0][2].tolist() == [0, 3, 4, 6, 8]  # row starts included
    assert pieces[1][2].tolist() == [0, 4, 8]  # the document starts at 10 lie in piece 0
    assert pieces[0][3][:, 4].tolist() == [False, False]  # both rows' second pieces continue a document
    with pytest.raises(ValueError, match="does not split into 3"):
        cut_batch(ids, ids, None, 0, 3)


def test_the_cp_check_names_what_a_piece_cannot_hold() -> None:
    from models.config import ModelConfig
    from parallel.context_parallel import check_context_parallel

    model = ModelConfig(pattern="MR*", d_model=32, mixers={"mamba2": {"d_conv": 4, "head_dim": 8}, "rwkv7": {"head_dim": 8}})
    check_context_parallel(model, 12, 4)  # pieces of 3: Mamba2's halo of 3, RWKV-7's shift of 1
    with pytest.raises(ValueError, match=r"pieces of 2 tokens are shorter than the 3 tokens mamba2 reads"):
        check_context_parallel(model, 8, 4)
    with pytest.raises(ValueError, match=r"train.seq_len \(10\) must be divisible by parallel.cp \(4\)"):
        check_context_parallel(model, 10, 4)
    check_context_parallel(ModelConfig(pattern="T", d_model=32, mixers={"deltanet": {"use_short_conv": False}}), 2, 2)
    with pytest.raises(ValueError, match="mixers.mom.capacity"):
        check_context_parallel(ModelConfig(pattern="O", d_model=32, mixers={"mom": {"capacity": 1.0, "head_dim": 8}}), 64, 2)


def test_a_mixer_without_a_cp_plan_is_refused_by_name() -> None:
    from torch import nn

    from models.spec import Mixer, TensorParallelPlan
    from parallel.context_parallel import apply_context_parallel

    class Undeclared(Mixer):
        tp_plan = TensorParallelPlan()

    with pytest.raises(ValueError, match="Undeclared declare no cp_plan"):
        apply_context_parallel(nn.Sequential(Undeclared()), group=None)
