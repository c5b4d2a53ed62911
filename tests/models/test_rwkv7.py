"""RWKV-7: the chunked DPLR op against its step recurrence and against the delta rule; the
time-mix mixer (decoding, packed documents, value residual), the channel-mix, and whole models."""
from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import models.ops as ops
from models.config import ModelConfig
from models.mixers.rwkv7 import RWKV7, RWKV7ChannelMix, lora_rank
from models.model import HybridLM
from optim.adamw import wants_weight_decay
from pretrain.generate import generate
from tests.mixer_checks import assert_close64

torch.set_num_threads(1)

H, K, V = 2, 8, 16
ATOL = 1e-10


# --- the op -----------------------------------------------------------------------------------


def leaves(**tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: x.detach().requires_grad_() for name, x in tensors.items()}


def rwkv7_inputs(batch: int, length: int, n_states: int | None, seed: int = 0) -> dict[str, torch.Tensor]:
    """float64 inputs shaped like RWKV-7's: log decay w in (-e^-0.5, 0), a = -kappa and
    b = kappa * lr for a unit key kappa and a learning rate lr in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    kappa = F.normalize(randn(batch, length, H, K), dim=-1)
    lr = torch.rand(batch, length, H, K, generator=gen, dtype=torch.float64)
    inputs = {
        "r": randn(batch, length, H, K),
        "w": -0.6065 * torch.sigmoid(randn(batch, length, H, K)),
        "k": randn(batch, length, H, K),
        "v": randn(batch, length, H, V),
        "a": -kappa,
        "b": kappa * lr,
    }
    if n_states is not None:
        inputs["initial_state"] = randn(n_states, H, K, V)
    return leaves(**inputs)


def run(fn: Callable, inputs: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return fn(**inputs, output_final_state=True, **kwargs)


def outputs_and_gradients(fn: Callable, inputs: dict, **kwargs) -> dict[str, torch.Tensor]:
    """o, the final state, and the gradient of every input under fixed random upstream gradients."""
    o, final = run(fn, inputs, **kwargs)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    dfinal = torch.randn(final.shape, generator=gen, dtype=final.dtype)
    grads = torch.autograd.grad((o * do).sum() + (final * dfinal).sum(), list(inputs.values()))
    return {"o": o, "final_state": final, **{f"d{name}": g for name, g in zip(inputs, grads)}}


def assert_same(got: dict, expected: dict, atol: float = ATOL) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "batch, length, chunk_size, with_initial_state",
    [(2, 64, 16, True), (2, 50, 16, True), (1, 5, 16, False), (1, 30, 12, True), (2, 40, 64, False)],
    ids=["multiple-of-chunk", "padded", "shorter-than-chunk", "chunk-not-power-of-2", "no-initial-state"],
)
def test_chunked_equals_recurrence(batch, length, chunk_size, with_initial_state):
    inputs = rwkv7_inputs(batch, length, batch if with_initial_state else None)
    got = outputs_and_gradients(ops.chunk_rwkv7, inputs, chunk_size=chunk_size)
    expected = outputs_and_gradients(ops.recurrent_rwkv7, inputs)
    assert expected["o"].abs().max() > 1 and expected["dw"].abs().max() > 1e-2
    assert_same(got, expected)


@pytest.mark.parametrize("with_initial_states", [True, False], ids=["initial-states", "no-initial-states"])
def test_packed_documents_equal_documents_one_by_one(with_initial_states):
    """Documents of 17, 1, 0, 14, 40 and 5 tokens, chunk 16: starts inside chunks and on a chunk
    boundary, a 1-token and an empty document; without initial states they share chunks."""
    lengths = [17, 1, 0, 14, 40, 5]
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    inputs = rwkv7_inputs(1, sum(lengths), len(lengths) if with_initial_states else None)
    got = outputs_and_gradients(ops.chunk_rwkv7, inputs, cu_seqlens=torch.tensor(bounds), chunk_size=16)

    def one_by_one(
        output_final_state: bool, initial_state: torch.Tensor | None = None, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, finals = [], []
        for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            document = {name: x[:, start:end] for name, x in inputs.items()}
            if initial_state is not None:
                document["initial_state"] = initial_state[n : n + 1]
            o, final = run(ops.recurrent_rwkv7, document)
            outputs.append(o)
            finals.append(final)
        return torch.cat(outputs, dim=1), torch.cat(finals)

    assert_same(got, outputs_and_gradients(one_by_one, inputs))


def test_recurrence_is_the_papers_update_transposed():
    """The papers' layout, S [V, K]: S_t = S_{t-1}(diag(exp w_t) + a_t b_t^T) + v_t k_t^T and
    o_t = S_t r_t; ebb's state is S^T [K, V]."""
    inputs = {name: x.detach() for name, x in rwkv7_inputs(1, 9, 1).items()}
    o, final = run(ops.recurrent_rwkv7, inputs)
    S = inputs["initial_state"][0].transpose(-1, -2)  # [H, V, K]
    step = {name: inputs[name][0] for name in ("r", "w", "k", "v", "a", "b")}
    for t in range(9):
        r, w, k, v, a, b = (step[name][t] for name in ("r", "w", "k", "v", "a", "b"))
        transition = torch.diag_embed(w.exp()) + a[:, :, None] * b[:, None, :]
        S = S @ transition + v[:, :, None] * k[:, None, :]
        torch.testing.assert_close(o[0, t], (S @ r[:, :, None])[..., 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(final[0], S.transpose(-1, -2), atol=ATOL, rtol=0)


def test_no_decay_and_a_minus_beta_k_b_k_is_the_delta_rule():
    """With unit keys k, w = 0 (no decay), a = -beta k, b = k and the write key beta k, the DPLR
    update S + b (a^T S) + k' v^T = S - beta k k^T S + beta k v^T = S + k (beta (v - S^T k))^T is
    the delta rule's; the read-out is the same with r = q."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 37, H, K, generator=gen, dtype=torch.float64)
    k = F.normalize(torch.randn(2, 37, H, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(2, 37, H, V, generator=gen, dtype=torch.float64)
    beta = torch.rand(2, 37, H, generator=gen, dtype=torch.float64)
    state = torch.randn(2, H, K, V, generator=gen, dtype=torch.float64)
    b = beta[..., None]
    o, final = ops.chunk_rwkv7(
        q, torch.zeros_like(k), b * k, v, -b * k, k, scale=0.5, initial_state=state, output_final_state=True, chunk_size=16
    )
    o_ref, final_ref = ops.chunk_delta_rule(q, k, v, beta, scale=0.5, initial_state=state, output_final_state=True, chunk_size=16)
    assert_same({"o": o, "final_state": final}, {"o": o_ref, "final_state": final_ref})


def test_default_scale_is_one_and_dtypes_follow_the_other_ops():
    inputs = {name: x.detach() for name, x in rwkv7_inputs(1, 20, None).items()}
    o_one, _ = ops.chunk_rwkv7(**inputs, scale=1.0)
    assert torch.equal(ops.chunk_rwkv7(**inputs)[0], o_one)
    low = {name: x.to(torch.bfloat16) for name, x in inputs.items()}
    o, final = ops.chunk_rwkv7(**low, output_final_state=True, chunk_size=8)
    assert (o.dtype, final.dtype) == (torch.bfloat16, torch.float32)
    torch.testing.assert_close(o.double(), ops.recurrent_rwkv7(**inputs)[0], atol=0.1, rtol=0.05)
    assert ops.chunk_rwkv7(**low)[1] is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fla_kernel_matches_torch_chunks(monkeypatch):
    pytest.importorskip("fla")
    lengths = [100, 1, 200, 27]
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    inputs = leaves(**{name: x.float().cuda() for name, x in rwkv7_inputs(1, sum(lengths), len(lengths)).items()})
    monkeypatch.setenv("EBB_OPS_BACKEND", "auto")
    got = outputs_and_gradients(ops.chunk_rwkv7, inputs, cu_seqlens=bounds)
    monkeypatch.setenv("EBB_OPS_BACKEND", "torch")
    expected = outputs_and_gradients(ops.chunk_rwkv7, inputs, cu_seqlens=bounds)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-3, rtol=2e-3, msg=lambda m: f"{name}: {m}")


# --- the mixer --------------------------------------------------------------------------------

D_MODEL = 32
SMALL_MIXERS = {
    "rwkv7": {"head_dim": 8, "chunk_size": 4},
    "attention": {"num_heads": 2},
    "mamba2": {"d_state": 8, "head_dim": 8, "chunk_size": 4},
    "deltanet": {"num_heads": 2, "chunk_size": 4},
    "gated_deltanet": {"num_heads": 2, "head_dim": 8, "chunk_size": 4},
}


def small_config(pattern: str, **rwkv7_options) -> ModelConfig:
    mixers = {**SMALL_MIXERS, "rwkv7": {**SMALL_MIXERS["rwkv7"], **rwkv7_options}}
    return ModelConfig(pattern=pattern, d_model=D_MODEL, vocab_size=64, mixers=mixers)


@torch.no_grad()
def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """float64, every parameter moved off its official init (which zeroes out_proj, the LoRAs'
    first matrices and the channel-mix's W_v, so that a fresh block outputs zeros)."""
    torch.manual_seed(seed)
    module = module.double()
    for p in module.parameters():
        p.add_(0.3 * torch.randn_like(p))
    return module


def rwkv7_block(layer_idx: int, pattern: str = "RTR", **options) -> RWKV7:
    return randomised(RWKV7(small_config(pattern, **options), layer_idx), seed=layer_idx)


def time_mix_by_the_papers(m: RWKV7, x: torch.Tensor, v_first: torch.Tensor) -> torch.Tensor:
    """docs/layers.md 4a-b token by token for one sequence x [T, C], the state in the papers'
    layout [V, K] and the decay in its softplus form w = exp(-exp(-softplus(-d) - 0.5))."""
    H, N = m.r_k.shape
    lora = lambda m, x: m.up.weight @ (m.activation or (lambda h: h))(m.down.weight @ x)  # noqa: E731
    S = x.new_zeros(H, N, N)
    previous, outputs = x.new_zeros(x.shape[1]), []
    for t, x_t in enumerate(x):
        x_r, x_w, x_k, x_v, x_a, x_g = (x_t + (previous - x_t) * mu for mu in m.mu)
        previous = x_t
        r, k, v = m.r_proj.weight @ x_r, m.k_proj.weight @ x_k, m.v_proj.weight @ x_v
        w = torch.exp(-torch.exp(-F.softplus(-(m.w0 + lora(m.w_lora, x_w))) - 0.5))
        a = torch.sigmoid(m.a0 + lora(m.a_lora, x_a))
        if not m.is_first:
            v = v + (v_first[t] - v) * torch.sigmoid(m.v0 + lora(m.v_lora, x_v))
        kappa = (k * m.k_k).view(H, N)
        kappa = kappa / kappa.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = k * (1 + (a - 1) * m.k_a)
        r, w, k, v, a = (t.view(H, N) for t in (r, w, k, v, a))
        transition = torch.diag_embed(w) - kappa[:, :, None] * (a * kappa)[:, None, :]
        S = S @ transition + v[:, :, None] * k[:, None, :]
        y = (S @ r[:, :, None])[..., 0]
        mean, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
        y = ((y - mean) / torch.sqrt(var + m.o_norm.eps)).flatten() * m.o_norm.weight + m.o_norm.bias
        y = y + ((r * k * m.r_k).sum(-1, keepdim=True) * v).flatten()
        outputs.append(m.out_proj.weight @ (y * lora(m.g_lora, x_g)))
    return torch.stack(outputs)


@pytest.mark.parametrize("layer_idx", [0, 2], ids=["first-R-block", "later-R-block"])
def test_mixer_matches_the_papers_formulas(layer_idx):
    mixer = rwkv7_block(layer_idx)
    x, v_first = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        ours = mixer(x[None], carry={"v_first": v_first[None]})[0]
        expected = time_mix_by_the_papers(mixer, x, v_first)
    assert expected.abs().max() > 0.1
    assert_close64(ours, expected)


def test_mixer_keeps_its_promised_decay_bound(monkeypatch):
    """The mixer tells the op lower_bound = -e^-0.5 (fla's kernel then runs chunks of 64 on tensor
    cores); its log decays stay above it even with far-off decay parameters."""
    import models.mixers.rwkv7 as rwkv7

    seen = []
    monkeypatch.setattr(rwkv7, "chunk_rwkv7", lambda r, w, *args, **kw: seen.append((w, kw["lower_bound"])) or ops.chunk_rwkv7(r, w, *args, **kw))
    mixer = rwkv7_block(0)
    with torch.no_grad():
        mixer.w0.fill_(40.0)  # sigmoid -> 1: the strongest decay
        mixer(torch.randn(1, 13, D_MODEL, dtype=torch.float64))
    ((w, lower_bound),) = seen
    assert lower_bound == pytest.approx(-math.exp(-0.5))
    assert w.min() >= lower_bound and w.min() < 0.99 * lower_bound


@pytest.mark.parametrize("layer_idx", [0, 2], ids=["first-R-block", "later-R-block"])
def test_mixer_decoding_matches_full_forward(layer_idx):
    """Token by token, and prefill then decode, equal the full forward (float64): the token shift
    continues from the cache and the state is carried; a later block reads v_first per token."""
    mixer = rwkv7_block(layer_idx)
    x = torch.randn(2, 11, D_MODEL, dtype=torch.float64)
    v_first = torch.randn(2, 11, D_MODEL, dtype=torch.float64)

    def call(start: int, end: int, cache: dict | None) -> torch.Tensor:
        return mixer(x[:, start:end], cache=cache, carry={"v_first": v_first[:, start:end]})

    with torch.no_grad():
        full = call(0, 11, None)
        cache: dict = {}
        stepwise = torch.cat([call(t, t + 1, cache) for t in range(11)], dim=1)
        sizes = {key: value.shape for key, value in cache.items()}
        cache = {}
        pieces = [call(0, 6, cache), call(6, 9, cache)] + [call(t, t + 1, cache) for t in range(9, 11)]
    assert full.abs().max() > 0.1
    assert_close64(stepwise, full)
    assert_close64(torch.cat(pieces, dim=1), full)
    assert sizes == {"shift": (2, 1, D_MODEL), "state": (2, D_MODEL // 8, 8, 8)}  # constant memory


@pytest.mark.parametrize("layer_idx", [0, 2], ids=["first-R-block", "later-R-block"])
def test_mixer_packed_documents_match_each_document_alone(layer_idx):
    """Rows of 10 tokens hold documents of 3, 7 | 4, 1, 5: no state and no token shift crosses a
    document start."""
    mixer = rwkv7_block(layer_idx)
    x = torch.randn(2, 10, D_MODEL, dtype=torch.float64)
    v_first = torch.randn(2, 10, D_MODEL, dtype=torch.float64)
    bounds = [0, 3, 10, 14, 15, 20]
    with torch.no_grad():
        packed = mixer(x, cu_seqlens=torch.tensor(bounds), carry={"v_first": v_first}).reshape(20, D_MODEL)
        tokens, values = x.reshape(1, 20, D_MODEL), v_first.reshape(1, 20, D_MODEL)
        for start, end in zip(bounds[:-1], bounds[1:]):
            alone = mixer(tokens[:, start:end], carry={"v_first": values[:, start:end]})[0]
            assert_close64(packed[start:end], alone)


def test_value_residual_flows_from_the_first_r_block_through_the_carry():
    """Pattern "RTR": block 0 stores its values in carry["v_first"]; block 2's output depends on
    them, so its gradient reaches block 0's v projection even though block 2's input does not
    depend on block 0. Block 0 has no value-residual parameters; block 2 needs the carry."""
    first, later = rwkv7_block(0), rwkv7_block(2)
    assert first.is_first and first.v_lora is None and not later.is_first
    x0, x2 = torch.randn(2, 2, 9, D_MODEL, dtype=torch.float64)
    carry: dict = {}
    first(x0, carry=carry)
    assert carry["v_first"].shape == x0.shape
    grad = torch.autograd.grad(later(x2, carry=carry).square().sum(), first.v_proj.weight)[0]
    assert grad.abs().max() > 1e-3
    with pytest.raises(ValueError, match="v_first"):
        later(x2)


def test_channel_mix_token_shift_respects_documents_and_the_cache():
    mix = randomised(RWKV7ChannelMix(small_config("R"), 0))
    x = torch.randn(1, 12, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        packed = mix(x, cu_seqlens=torch.tensor([0, 5, 12]))
        assert_close64(packed[:, :5], mix(x[:, :5]))
        assert_close64(packed[:, 5:], mix(x[:, 5:]))
        assert not torch.allclose(packed[:, 5:], mix(x)[:, 5:])  # without cu_seqlens token 5 sees token 4
        cache: dict = {}
        stepwise = torch.cat([mix(x[:, t : t + 1], cache=cache) for t in range(12)], dim=1)
    assert_close64(stepwise, mix(x))


def test_official_init():
    cfg = small_config("RRRR", head_dim=8)
    blocks = [RWKV7(cfg, i) for i in range(4)]
    first, last = blocks[0], blocks[-1]
    assert torch.all(first.out_proj.weight == 0) and torch.all(first.w_lora.down.weight == 0)
    assert torch.allclose(first.mu[:, 0], torch.ones(6)) and (first.mu[:, 1:] < 1).all()  # ddd_0 = 0
    assert (last.mu.mean() < first.mu.mean()).item()  # deeper blocks shift less
    assert torch.allclose(first.k_a, torch.full_like(first.k_a, 1.02)) and torch.allclose(first.r_k, torch.full_like(first.r_k, -0.04))
    log_w = -math.exp(-0.5) * torch.sigmoid(first.w0)
    assert log_w.min() > -0.6066 and log_w.max() < 0
    assert torch.allclose(last.o_norm.weight, torch.ones(D_MODEL))  # ((l + 1) / L)^0.7 = 1 at the top
    vectors = [first.mu, first.w0, first.a0, first.k_k, first.k_a, first.r_k, blocks[1].v0]
    assert not any(wants_weight_decay(p) for p in vectors)  # mu and r_k are matrices: marked
    assert wants_weight_decay(first.r_proj.weight) and wants_weight_decay(first.w_lora.up.weight)
    assert (lora_rank(2.5, 4096), lora_rank(1.7, 4096), lora_rank(5.0, 4096), lora_rank(2.5, 256)) == (160, 96, 320, 32)
    assert RWKV7(small_config("R", decay_rank=16), 0).w_lora.down.out_features == 16


def test_flops_follow_width_not_context():
    narrow, wide = RWKV7(small_config("R"), 0), RWKV7(ModelConfig(pattern="R", d_model=64, mixers=SMALL_MIXERS), 0)
    assert 0 < narrow.flops_per_token(256) < wide.flops_per_token(256)
    assert narrow.flops_per_token(4096) == narrow.flops_per_token(256)


# --- whole models -----------------------------------------------------------------------------


def test_model_flops_count_the_channel_mix_of_r_blocks():
    model = HybridLM(small_config("R*", channel_mix_hidden=96))
    r_block, attention_block = model.blocks
    assert r_block.mlp.flops_per_token() == 2 * 2 * D_MODEL * 96
    expected = sum(b.mixer.flops_per_token(64) + b.mlp.flops_per_token() for b in model.blocks) + 2 * D_MODEL * 64
    assert model.flops_per_token(64) == pytest.approx(expected)
    assert isinstance(r_block.mlp, RWKV7ChannelMix) and not isinstance(attention_block.mlp, RWKV7ChannelMix)


@pytest.mark.parametrize("pattern", ["RRR*", "MRTG*"])
def test_model_trains_with_falling_loss(pattern):
    torch.manual_seed(0)
    model = HybridLM(small_config(pattern))
    assert all(isinstance(b.mlp, RWKV7ChannelMix) == (b.kind == "R") for b in model.blocks)
    ids = torch.randint(0, 64, (4, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1], cu_seqlens=torch.tensor([0, 10, 23, 46, 69, 92]))
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("pattern, channel_mix", [("RRR*", True), ("MRTG*", True), ("RR", False)])
def test_generation_equals_argmax_of_full_forwards(pattern, channel_mix):
    torch.manual_seed(0)
    model = randomised(HybridLM(small_config(pattern, channel_mix=channel_mix))).eval()
    prompt = [5, 17, 3, 42, 9, 11, 60]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    expected = ids[len(prompt):]
    assert len(set(expected)) > 1
    assert generate(model, prompt, max_new_tokens=10) == expected
