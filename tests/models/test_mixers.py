"""Mixers: Mamba2 against transformers, decoding from the cache against the full forward,
packed documents against each document alone, the delta rules' transition eigenvalues, GVA,
initialisation and FLOP counts."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import models.ops as ops
from models.config import ModelConfig
from models.hf.mamba2_layout import from_transformers_layout, to_transformers_layout
from models.layers.conv import ShortConv
from models.mixers import PATTERN, SPECS
from models.model import build_mixer
from tests.mixer_checks import SMALL_MIXERS, assert_close64, assert_decoding_matches_full_forward, assert_packed_documents_match_each_alone

torch.set_num_threads(1)

D_MODEL = 32

# (pattern character, overrides of its config section): every option that changes the math
CASES = [
    ("*", {}),
    ("*", {"window_size": 3, "qkv_bias": True}),
    ("M", {}),
    ("M", {"n_groups": 2}),
    ("T", {}),
    ("T", {"use_gate": True, "allow_neg_eigval": True}),
    ("T", {"use_short_conv": False, "use_beta": False}),
    ("G", {}),
    ("G", {"num_v_heads": 4, "allow_neg_eigval": True}),
]
CASE_IDS = [kind + "".join(f"-{k}={v}" for k, v in opts.items()) for kind, opts in CASES]


def small_config(kind: str, d_model: int = D_MODEL, **options) -> ModelConfig:
    """A one-block model config; init_std 0.2 without residual rescaling keeps outputs O(1), so
    absolute tolerances mean what they say."""
    mixers = {name: dict(section) for name, section in SMALL_MIXERS.items()}
    mixers.setdefault(PATTERN[kind], {}).update(options)  # a mixer without a SMALL_MIXERS entry: its defaults
    return ModelConfig(pattern=kind, d_model=d_model, init_std=0.2, rescale_residual=False, mixers=mixers)


def small_mixer(kind: str, dtype: torch.dtype = torch.float64, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    mixer = build_mixer(kind, small_config(kind, **options), layer_idx=0).to(dtype)
    with torch.no_grad():  # norm weights and biases start at 1 and 0: make them matter
        for name, p in mixer.named_parameters():
            if name.endswith(("norm.weight", "proj.bias", "conv1d.bias")):
                p.add_(0.3 * torch.randn_like(p))
    return mixer


# --- Mamba2 against transformers ------------------------------------------------------------


@pytest.mark.parametrize("n_groups", [1, 2])
def test_mamba2_matches_transformers(n_groups):
    """Same weights (our state dict in transformers' layout, `to_transformers_layout`), same
    output. transformers' pure-PyTorch path (eval mode on CPU: causal_conv1d_fn + mamba2_chunk_scan)
    runs its scan in float32 whatever the input dtype, hence a float32 comparison."""
    from transformers import Mamba2Config as HFMamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    ours = small_mixer("M", torch.float32, n_groups=n_groups, chunk_size=8).eval()
    c = ours.cfg
    hf_config = HFMamba2Config(
        hidden_size=D_MODEL, num_heads=ours.num_heads, head_dim=c.head_dim, state_size=c.d_state,
        n_groups=n_groups, expand=c.expand, conv_kernel=c.d_conv, chunk_size=c.chunk_size,
        use_bias=False, use_conv_bias=True, layer_norm_epsilon=c.norm_eps, num_hidden_layers=1,
    )
    theirs = Mamba2Mixer(hf_config, layer_idx=0).eval()
    layout = (ours.d_inner, c.d_state, n_groups, ours.num_heads)
    theirs.load_state_dict(to_transformers_layout(ours.state_dict(), *layout), strict=True)
    round_trip = from_transformers_layout(theirs.state_dict(), *layout)
    assert all(torch.equal(round_trip[name], p) for name, p in ours.state_dict().items())

    x = torch.randn(2, 21, D_MODEL)  # 21: a partial last chunk
    with torch.no_grad():
        expected = theirs(x)
        actual = ours(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# --- decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, options", CASES, ids=CASE_IDS)
def test_decoding_matches_full_forward(kind, options):
    assert_decoding_matches_full_forward(small_mixer(kind, **options), D_MODEL)


@pytest.mark.parametrize("kind", list(PATTERN))
def test_every_registered_mixer_decodes_and_packs_documents(kind):
    """Its defaults (with the small sizes above where known): from the cache as in one forward,
    and each packed document as alone. Every weight is moved off its init (RWKV-7's zeroes
    out_proj), so that the output depends on everything."""
    mixer = small_mixer(kind)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert_decoding_matches_full_forward(mixer, D_MODEL)
    assert_packed_documents_match_each_alone(mixer, D_MODEL)


@pytest.mark.parametrize("kind", ["M", "T", "G"])
def test_linear_mixers_decode_in_constant_memory(kind):
    mixer = small_mixer(kind)
    cache: dict = {}
    with torch.no_grad():
        mixer(torch.randn(1, 9, D_MODEL, dtype=torch.float64), cache=cache)
        sizes = {key: value.shape for key, value in cache.items()}
        mixer(torch.randn(1, 5, D_MODEL, dtype=torch.float64), cache=cache)
    assert sizes == {key: value.shape for key, value in cache.items()}


def test_sliding_window_cache_keeps_only_the_window():
    mixer = small_mixer("*", window_size=3)
    cache: dict = {}
    with torch.no_grad():
        mixer(torch.randn(1, 9, D_MODEL, dtype=torch.float64), cache=cache)
        mixer(torch.randn(1, 1, D_MODEL, dtype=torch.float64), cache=cache)
    assert cache["k"].shape[1] == cache["v"].shape[1] == 3 and cache["position"] == 10


# --- packed documents -----------------------------------------------------------------------


@pytest.mark.parametrize("kind, options", CASES, ids=CASE_IDS)
def test_packed_documents_match_each_document_alone(kind, options):
    assert_packed_documents_match_each_alone(small_mixer(kind, **options), D_MODEL)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("window", [None, 4, 150])
@pytest.mark.parametrize("rows, cuts", [(2, [7, 70, 80, 81, 140]), (1, [100, 129, 256, 290])], ids=["rows-of-80", "384-tokens-3-blocks"])
def test_flex_attention_over_packed_documents_matches_the_dense_mask(window, rows, cuts):
    """The block-sparse document mask (flex attention, compiled; what CUDA runs by default) gives
    SDPA's outputs under the dense [T, T] mask: GQA, RoPE restarting per document, a sliding
    window, documents crossing block and row boundaries, rows of several 128-token blocks (some
    skipped, some whole, some masked per token). (Flex has no backward on CPU; the CUDA test
    compares gradients too.)"""
    length = 80 if rows == 2 else 384
    x = torch.randn(rows, length, D_MODEL, generator=torch.Generator().manual_seed(1))
    cu_seqlens = torch.tensor([0, *cuts, rows * length], dtype=torch.int32)
    with torch.no_grad():
        sdpa, flex = (small_mixer("*", torch.float32, window_size=window, packed_kernel=k)(x, cu_seqlens=cu_seqlens) for k in ("sdpa", "flex"))
    torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [None, 5, 17, 40])
@pytest.mark.parametrize("length, block", [(100, 16), (96, 16), (300, 32)])
def test_document_blocks_are_those_create_block_mask_finds(window, length, block):
    """The block flags built from document boundaries in O(n^2) are exactly those torch's
    create_block_mask finds by evaluating the [T, T] mask: partial and full, over random packings."""
    from torch.nn.attention.flex_attention import create_block_mask

    from models.mixers.attention import document_blocks
    from models.packing import document_ids, positions_in_documents

    rows, n = 3, -(-length // block)
    cuts = torch.randint(1, rows * length, (12,), generator=torch.Generator().manual_seed(length + (window or 0))).tolist()
    cu_seqlens = torch.tensor(sorted({0, *cuts, length, rows * length}), dtype=torch.int32)
    documents = document_ids(cu_seqlens, rows * length).view(rows, length)
    positions = positions_in_documents(cu_seqlens, rows * length).view(rows, length)

    def mask_mod(b, h, q, k):
        seen = (documents[b, q] == documents[b, k]) & (positions[b, q] >= positions[b, k])
        return seen if window is None else seen & (positions[b, q] - positions[b, k] < window)

    def flags(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        kept = torch.arange(n)[None, None, None, :] < counts[..., None]
        return torch.zeros(rows, 1, n, n, dtype=torch.bool).scatter_(-1, indices.long(), kept)[:, 0]

    want = create_block_mask(mask_mod, rows, None, length, length, device="cpu", BLOCK_SIZE=block)
    some, every = document_blocks(documents, window, block)
    assert torch.equal(some & ~every, flags(want.kv_num_blocks, want.kv_indices))
    assert torch.equal(every, flags(want.full_kv_num_blocks, want.full_kv_indices))
    assert every.any() if window is None else (~some).tril(-1).any()  # whole blocks, or blocks the window skips


def test_short_conv_matches_conv1d_and_stops_at_document_start_mask():
    torch.manual_seed(0)
    conv = ShortConv(6, 4, bias=True, activation=False).double()
    x = torch.randn(1, 12, 6, dtype=torch.float64)
    reference = F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=3, groups=6)[..., :12].transpose(1, 2)
    y, tail = conv(x)
    assert_close64(y, reference)
    assert_close64(tail, x[:, -3:])
    packed, _ = conv(x, cu_seqlens=torch.tensor([0, 5, 12]))
    assert_close64(packed[:, :5], conv(x[:, :5])[0])
    assert_close64(packed[:, 5:], conv(x[:, 5:])[0])


# --- transition eigenvalues of the delta rules ------------------------------------------------


@pytest.mark.parametrize("kind", ["T", "G"])
@pytest.mark.parametrize("allow_neg_eigval", [False, True])
def test_delta_rule_transition_eigenvalues(kind, allow_neg_eigval):
    """The per-token transition alpha (I - beta k k^T), built from the mixer's own k (after conv
    and l2norm), beta and alpha: eigenvalues in [0, 1], or in [-1, 1] with some negative when
    negative eigenvalues are allowed."""
    torch.manual_seed(0)
    cfg = small_config(kind, allow_neg_eigval=allow_neg_eigval)
    cfg.init_std = 1.0  # wide gate pre-activations reach the ends of beta's range
    mixer = build_mixer(kind, cfg, layer_idx=0).double()
    with torch.no_grad():
        inputs = mixer.recurrence_inputs(torch.randn(2, 16, D_MODEL, dtype=torch.float64))
    k, beta = inputs[1], inputs[-1]
    alpha = inputs[3].exp() if kind == "G" else torch.ones_like(beta)
    eye = torch.eye(k.shape[-1], dtype=k.dtype)
    transition = alpha[..., None, None] * (eye - beta[..., None, None] * k[..., :, None] * k[..., None, :])
    eigenvalues = torch.linalg.eigvalsh(transition)
    low = -1.0 if allow_neg_eigval else 0.0
    assert eigenvalues.min() >= low - 1e-12 and eigenvalues.max() <= 1.0 + 1e-12
    assert (eigenvalues < 0).any() == allow_neg_eigval
    assert (beta > 1).any() == allow_neg_eigval


@pytest.mark.parametrize("kind", ["T", "G"])
def test_beta_stays_float32_under_bf16_autocast(kind):
    """As fla's Gated DeltaNet computes it: the activations go to the op in bf16, beta does not."""
    mixer = small_mixer(kind, dtype=torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        q, *_, beta = mixer.recurrence_inputs(torch.randn(1, 9, D_MODEL))
        b = mixer.b_proj(torch.randn(1, 9, D_MODEL))
    assert q.dtype == torch.bfloat16 and b.dtype == torch.bfloat16 and beta.dtype == torch.float32


# --- grouped value heads ----------------------------------------------------------------------


def test_gated_deltanet_gva_shares_each_key_head_between_value_heads():
    """The mixer hands the op 2 q/k heads for 4 value heads (as fla's kernel takes them, no copy);
    the chunked and step ops give what they give on q/k repeated to the value heads, head 0
    serving value heads 0 and 1."""
    mixer = small_mixer("G", num_heads=2, num_v_heads=4)
    x = torch.randn(1, 7, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        q, k, v, g, beta = mixer.recurrence_inputs(x)
        y = mixer(x)
    assert q.shape[2] == k.shape[2] == 2 and v.shape[2] == g.shape[2] == beta.shape[2] == 4
    assert y.shape == x.shape and torch.isfinite(y).all()
    state = torch.randn(1, 4, q.shape[-1], v.shape[-1], dtype=torch.float64)
    repeated = [t.repeat_interleave(2, dim=2) for t in (q, k)]
    for op in (ops.chunk_gated_delta_rule, ops.recurrent_gated_delta_rule):
        got = op(q, k, v, g, beta, initial_state=state, output_final_state=True)
        want = op(*repeated, v, g, beta, initial_state=state, output_final_state=True)
        for a, b in zip(got, want):
            assert_close64(a, b)
    with pytest.raises(ValueError, match=r"the value heads \(4\) must be a multiple of the q/k heads \(3\)"):
        ops.chunk_gated_delta_rule(q[:, :, :1].expand(-1, -1, 3, -1), k[:, :, :1].expand(-1, -1, 3, -1), v, g, beta)


# --- initialisation, registry, FLOPs ----------------------------------------------------------


def test_decay_parameters_follow_the_papers_and_skip_weight_decay():
    torch.manual_seed(0)
    mixers = {"mamba2": {"head_dim": 4}, "gated_deltanet": {"num_heads": 16, "head_dim": 8}}
    cfg = ModelConfig(pattern="MG", d_model=64, mixers=mixers)
    mamba, gdn = build_mixer("M", cfg, 0), build_mixer("G", cfg, 1)
    for mixer, (a_low, a_high) in [(mamba, (1.0, 16.0)), (gdn, (0.0, 16.0))]:
        A = mixer.A_log.exp()
        dt = F.softplus(mixer.dt_bias)
        assert a_low <= A.min() and A.max() <= a_high and A.max() - A.min() > 4
        assert 1e-3 * (1 - 1e-5) <= dt.min() and dt.max() <= 0.1 * (1 + 1e-5)
        assert mixer.A_log._no_weight_decay and mixer.dt_bias._no_weight_decay
    assert torch.equal(mamba.D, torch.ones_like(mamba.D)) and mamba.D._no_weight_decay


def test_out_proj_rescaled_by_residual_branches():
    for kind in PATTERN:
        if kind == "R":  # RWKV-7's official init zeroes out_proj (tests/models/test_rwkv7.py)
            continue
        plain = build_mixer(kind, ModelConfig(pattern=kind * 8, d_model=64, rescale_residual=False), 0)
        scaled = build_mixer(kind, ModelConfig(pattern=kind * 8, d_model=64), 0)
        ratio = (scaled.out_proj.weight.std() / plain.out_proj.weight.std()).item()
        assert ratio == pytest.approx(1 / math.sqrt(2 * 8), rel=0.15), kind


def test_registry_builds_every_mixer_and_rejects_unknown_characters():
    cfg = small_config("*")
    for kind, name in PATTERN.items():
        mixer = build_mixer(kind, small_config(kind), layer_idx=3)
        assert isinstance(mixer, SPECS[name].module) and isinstance(mixer.out_proj, torch.nn.Linear)
    with pytest.raises(ValueError, match="no mixer for pattern character 'X'"):
        build_mixer("X", cfg, 0)


@pytest.mark.parametrize("kind", list(PATTERN))
def test_flops_per_token_positive_and_growing_with_width(kind):
    narrow = build_mixer(kind, small_config(kind, d_model=32), 0).flops_per_token(256)
    wide = build_mixer(kind, small_config(kind, d_model=64), 0).flops_per_token(256)
    assert 0 < narrow < wide


def test_flops_grow_with_context_only_for_attention():
    for kind in ["M", "T", "G"]:
        mixer = build_mixer(kind, small_config(kind), 0)
        assert mixer.flops_per_token(4096) == mixer.flops_per_token(256)
    full = build_mixer("*", small_config("*"), 0)
    windowed = build_mixer("*", small_config("*", window_size=64), 0)
    assert full.flops_per_token(4096) > full.flops_per_token(256)
    assert windowed.flops_per_token(4096) < full.flops_per_token(4096)
    # causal attention: ~T/2 keys per query, each costing 4 * num_heads * head_dim
    extra = full.flops_per_token(4096) - full.flops_per_token(2048)
    assert extra == pytest.approx(4 * 4 * 8 * 2048 / 2)
