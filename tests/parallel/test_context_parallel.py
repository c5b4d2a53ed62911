"""Context parallelism for every registered mixer: cp 2 and cp 4 gloo ranks, each holding a
contiguous piece of every row, against one process in float64 (to 1e-10): the outputs, the
input's gradient and every parameter's (summed over the ranks), with rows of one document and
with packed documents that cross pieces: a document of 1 and of 2 tokens (shorter than a chunk),
one of 11 (longer than a piece, over 3 pieces at cp 4), starts on a piece boundary and inside
pieces. The routed mixers' auxiliary losses, each rank's share summed, equal one process's too.
Each mixer runs as two blocks with their MLPs (RWKV-7's value residual and channel-mix
token shift), its chunk (4) shorter than a piece. One spawn per world size checks every case."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from models.config import ModelConfig
from models.context import context_parallel
from models.mixers import PATTERN
from models.model import CarryView, HybridLM
from models.packing import with_row_starts
from parallel.context_parallel import apply_context_parallel
from parallel.data_parallel import apply_activation_checkpointing
from tests.distributed import run_distributed
from tests.mixer_checks import SMALL_MIXERS
from tests.runs import run_bench

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

D_MODEL, BATCH, SEQ = 16, 2, 16
PACKED = torch.tensor([0, 2, 8, 13, 16, 20, 21, 32])  # rows of 16: [2, 6, 5, 3 | 4, 1, 11]
HYBRID = "hybrid"
EXTRA = {  # further variants of some mixers: (name, options)
    "attention-window3": ("attention", {"window_size": 3}),
    "attention-window6": ("attention", {"window_size": 6}),
    "sse-conv-mask": ("sse", {"use_short_conv": True, "impl": "mask"}),
    "sse-conv": ("sse", {"use_short_conv": True}),
    "gated_deltanet-gva": ("gated_deltanet", {"num_v_heads": 4, "allow_neg_eigval": True}),
    "gated_deltaproduct-3": ("gated_deltaproduct", {"num_householder": 3}),
    "rwkv7-swiglu": ("rwkv7", {"channel_mix": False}),
    "hybrid-checkpointed": (HYBRID, {}),  # every mixer once, each block recomputed in backward
}


def cases() -> dict[str, tuple[str, dict]]:
    """Every mixer of the registry with the small test options, plus `EXTRA`."""
    return {name: (name, {}) for name in PATTERN.values()} | EXTRA


def build(name: str, options: dict) -> HybridLM:
    """Two blocks of mixer `name` (HYBRID: one block of every mixer, activation-checkpointed)."""
    mixers = {n: dict(section) for n, section in SMALL_MIXERS.items()}
    mixers["rwkv7"] |= {"decay_rank": 8, "a_rank": 8, "v_rank": 8, "gate_rank": 8}
    if name == HYBRID:
        pattern = "".join(PATTERN)
    else:
        pattern = 2 * {mixer: c for c, mixer in PATTERN.items()}[name]
        mixers[name] = mixers.get(name, {}) | options
    cfg = ModelConfig(pattern=pattern, d_model=D_MODEL, vocab_size=8, mlp_hidden=32, init_std=0.2, rescale_residual=False, mixers=mixers)
    torch.manual_seed(0)
    model = HybridLM(cfg).to(torch.float64)
    with torch.no_grad():  # biases and norm weights away from their init, so they matter
        for n, p in model.named_parameters():
            if n.endswith(("norm.weight", "bias", "o_norm.weight")):
                p.add_(0.3 * torch.randn_like(p))
    if name == HYBRID:
        apply_activation_checkpointing(model, "full")
    return model


def blocks_forward(model: HybridLM, x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's blocks and final norm on x [B, T, d] (as HybridLM.forward after the
    embedding), and the routers' auxiliary loss (zero without routed mixers)."""
    if cu_seqlens is not None:
        cu_seqlens = with_row_starts(cu_seqlens, *x.shape[:2])
    carry = CarryView({})
    for block in model.blocks:
        x = block(x, cu_seqlens=cu_seqlens, carry=carry)
    return model.norm(x), torch.as_tensor(carry.get("aux_loss", 0.0))


def errors_at_every_case(only: tuple[str, ...] = ()) -> dict[str, float]:
    """On each rank: the largest difference of every case's output and gradients from the
    one-process run (`only`: those cases)."""
    torch.set_default_dtype(torch.float64)
    cp = apply_context_parallel(build("attention", {}), dist.group.WORLD)
    errors = {}
    for case, (name, options) in cases().items():
        if only and case not in only:
            continue
        for packed in (False, True):
            cu_seqlens = PACKED if packed else None
            g = torch.Generator().manual_seed(1)
            x = torch.randn(BATCH, SEQ, D_MODEL, generator=g)
            weight = torch.randn(BATCH, SEQ, D_MODEL, generator=g)
            reference = build(name, options)
            whole = x.clone().requires_grad_(True)
            out, aux = blocks_forward(reference, whole, cu_seqlens)
            ((out * weight).sum() + aux).backward()

            model = build(name, options)
            ids = torch.zeros(BATCH, SEQ, dtype=torch.long)
            _, _, local_cu, piece = cp.cut(ids, ids, cu_seqlens)
            cut = slice(piece.start, piece.start + piece.length)
            part = x[:, cut].clone().requires_grad_(True)
            with context_parallel(piece):
                local, aux_share = blocks_forward(model, part, local_cu)
                ((local * weight[:, cut]).sum() + aux_share).backward()
            aux_share = aux_share.detach().clone()
            dist.all_reduce(aux_share)
            diffs = [(local - out[:, cut]).abs().max(), (part.grad - whole.grad[:, cut]).abs().max(), (aux_share - aux).abs()]
            for p, q in zip(model.parameters(), reference.parameters()):
                if q.grad is None:  # the embedding and head: not in blocks_forward
                    continue
                grad = p.grad.clone()
                dist.all_reduce(grad)
                diffs.append((grad - q.grad).abs().max())
            errors[f"{case}{'-packed' if packed else ''}"] = max(float(d.detach()) for d in diffs)
            assert out.abs().max() > 0.1
    return errors


@pytest.mark.parametrize("size", [2, 4])
def test_every_mixer_under_context_parallelism_matches_one_process(size: int) -> None:
    errors = run_distributed(errors_at_every_case, size)
    worst = {case: max(rank[case] for rank in errors) for case in errors[0]}
    assert len(worst) == 2 * len(cases())
    failing = {case: e for case, e in worst.items() if not e < 1e-10}
    assert not failing, failing


def test_exchange_bench_tiny_runs(tmp_path) -> None:
    """bench/cp_exchange.py --tiny: the whole measurement at toy size (cp 2), so it cannot rot."""
    report, printed = run_bench("cp_exchange", "--tiny", "--cp", "2", out=tmp_path / "tiny.json")
    rows = report["rows"]
    assert [r["cp"] for r in rows] == [2]
    for r in rows:
        assert r["chain_s"] > 0 and r["all_gather_s"] > 0 and r["attention_slowest_over_mean"] > 0
        assert r["chain_bytes_per_rank"] < r["all_gather_bytes_per_rank"]  # one state against cp - 1 summaries
    assert "chain/AG" in printed
