"""Gated DeltaProduct (`P`, docs/layers.md section 10): the mixer against a token-by-token
reference written from the spec's recurrence and read from the weights directly, n_h = 1 against
Gated DeltaNet, decoding from the cache, packed documents, and the paper's state-tracking claim
on parity (n_h = 2 with negative eigenvalues learns it, one positive step per token cannot)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig
from models.model import HybridLM, build_mixer
from tests.mixer_checks import assert_close64, assert_decoding_matches_full_forward, assert_packed_documents_match_each_alone

torch.set_num_threads(1)

D_MODEL = 32
SMALL = dict(num_heads=2, head_dim=8, chunk_size=4)  # chunks of 4 steps cut through tokens when n_h > 1


def product_config(d_model: int = D_MODEL, **options) -> ModelConfig:
    """A one-block model config; init_std 0.2 without residual rescaling keeps outputs O(1)."""
    section = SMALL | options
    return ModelConfig(
        pattern="P", d_model=d_model, init_std=0.2, rescale_residual=False, mixers={"gated_deltaproduct": section}
    )


def randomised(mixer: nn.Module, seed: int = 1) -> nn.Module:
    """Norm weights start at 1: make them matter; A_log small enough that alpha stays visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        mixer.A_log.copy_(torch.rand(mixer.A_log.shape, generator=g, dtype=mixer.A_log.dtype).log())
    return mixer


def product_mixer(seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return randomised(build_mixer("P", product_config(**options), layer_idx=0).double())


# --- the spec's recurrence, token by token -----------------------------------------------------


def causal_conv_silu(conv: nn.Module | None, x: Tensor) -> Tensor:
    """x [T, C]: SiLU of the depthwise causal convolution (SiLU alone without one)."""
    if conv is None:
        return F.silu(x)
    W = conv.weight.shape[-1]
    y = F.conv1d(x.T[None], conv.weight, padding=W - 1, groups=x.shape[1])[0, :, : x.shape[0]]
    return F.silu(y.T)


def l2n(x: Tensor) -> Tensor:
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def reference_forward(mixer: nn.Module, x: Tensor) -> Tensor:
    """x [T, d] -> [T, d], from the weights and section 10: per value head h (reading q/k head
    h // group), S [d_v, d_k] starts at 0; for each token, n_h steps
    S <- a_j S (I - beta_j k_j k_j^T) + beta_j v_j k_j^T with a_1 = alpha_t and a_{j>1} = 1; the
    read-out o_t = S q_t / sqrt(d_k) follows the last step. Then the gated RMSNorm and out_proj.
    k/v/b rows are head-major: row (h, j, c) is head h, step j, channel c."""
    c = mixer.cfg
    n, H, K = c.num_householder, c.num_heads, c.head_dim
    Hv, V = c.num_v_heads or H, int(c.expand_v * c.head_dim)
    T = x.shape[0]
    q = l2n(causal_conv_silu(mixer.q_conv1d, x @ mixer.q_proj.weight.T).view(T, H, K))
    k = l2n(causal_conv_silu(mixer.k_conv1d, x @ mixer.k_proj.weight.T).view(T, H, n, K))
    v = causal_conv_silu(mixer.v_conv1d, x @ mixer.v_proj.weight.T).view(T, Hv, n, V)
    beta = torch.sigmoid(x @ mixer.b_proj.weight.T).view(T, Hv, n) * (2.0 if c.allow_neg_eigval else 1.0)
    alpha = torch.exp(-mixer.A_log.exp() * F.softplus(x @ mixer.a_proj.weight.T + mixer.dt_bias))  # [T, Hv]
    eye = torch.eye(K, dtype=x.dtype)
    o = x.new_zeros(T, Hv, V)
    for h in range(Hv):
        hk = h // (Hv // H)
        S = x.new_zeros(V, K)
        for t in range(T):
            for j in range(n):
                a = alpha[t, h] if j == 0 else 1.0
                kj = k[t, hk, j]
                S = a * S @ (eye - beta[t, h, j] * torch.outer(kj, kj)) + beta[t, h, j] * torch.outer(v[t, h, j], kj)
            o[t, h] = S @ q[t, hk] / K**0.5
    gate = (x @ mixer.g_proj.weight.T).view(T, Hv, V)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + c.norm_eps) * mixer.o_norm.weight * F.silu(gate)
    return o.reshape(T, Hv * V) @ mixer.out_proj.weight.T


REFERENCE_CASES = [  # (n_h, allow_neg_eigval, num_v_heads, expand_v)
    (1, False, None, 1.0),
    (1, True, 4, 2.0),
    (2, False, 4, 1.0),
    (2, True, None, 2.0),
    (3, False, None, 1.0),
    (3, True, 4, 1.0),
]


@pytest.mark.parametrize("n_h, neg, v_heads, expand_v", REFERENCE_CASES)
def test_matches_the_spec_recurrence_step_by_step(n_h, neg, v_heads, expand_v):
    mixer = product_mixer(num_householder=n_h, allow_neg_eigval=neg, num_v_heads=v_heads, expand_v=expand_v)
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        got = mixer(x)
        want = torch.stack([reference_forward(mixer, row) for row in x])
    assert want.abs().max() > 0.1
    assert_close64(got, want)


def test_negative_eigenvalues_double_beta_and_each_step_reflects():
    """With allow_neg_eigval every step's beta lies in (0, 2) and some exceed 1 (eigenvalue
    1 - beta < 0); without it beta stays in (0, 1)."""
    x = torch.randn(2, 16, D_MODEL, dtype=torch.float64)
    for neg in (False, True):
        mixer = product_mixer(num_householder=2, allow_neg_eigval=neg)
        with torch.no_grad():
            q, k, v, g, beta = mixer.recurrence_inputs(x)
        assert k.shape == (2, 16, 2, 2, 8) and beta.shape == (2, 16, 2, 2) and g.shape == (2, 16, 2)
        assert beta.min() > 0 and beta.max() < (2.0 if neg else 1.0)
        assert (beta > 1).any() == neg


# --- n_h = 1 is Gated DeltaNet --------------------------------------------------------------


@pytest.mark.parametrize("neg, v_heads", [(False, None), (True, 4)])
def test_one_householder_step_is_gated_deltanet(neg, v_heads):
    options = dict(SMALL, allow_neg_eigval=neg, num_v_heads=v_heads)
    cfg = ModelConfig(
        pattern="PG", d_model=D_MODEL, init_std=0.2, rescale_residual=False,
        mixers={"gated_deltaproduct": options | {"num_householder": 1}, "gated_deltanet": options},
    )
    product = product_mixer(num_householder=1, allow_neg_eigval=neg, num_v_heads=v_heads)
    gdn = build_mixer("G", cfg, layer_idx=1).double()
    gdn.load_state_dict(product.state_dict(), strict=True)
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        assert_close64(product(x), gdn(x))
    assert product.flops_per_token(256) == gdn.flops_per_token(256)


# --- decoding, packed documents, FLOPs --------------------------------------------------------


@pytest.mark.parametrize("n_h, options", [(2, {}), (3, {"num_v_heads": 4, "allow_neg_eigval": False}), (2, {"use_short_conv": False})])
def test_decoding_matches_full_forward(n_h, options):
    """A decode step of one token is an expansion of n_h steps from the cached state and conv tails."""
    assert_decoding_matches_full_forward(product_mixer(num_householder=n_h, **options), D_MODEL)


@pytest.mark.parametrize("n_h, options", [(2, {}), (3, {"num_v_heads": 4})])
def test_packed_documents_match_each_alone(n_h, options):
    assert_packed_documents_match_each_alone(product_mixer(num_householder=n_h, **options), D_MODEL)


def test_flops_count_n_h_steps_per_token():
    one, two = (build_mixer("P", product_config(num_householder=n, chunk_size=64), 0) for n in (1, 2))
    # twice the k/v/b projections, convs and recurrence steps; q, g, a and out_proj once
    assert one.flops_per_token(256) < two.flops_per_token(256) < 2 * one.flops_per_token(256)
    assert two.flops_per_token(4096) == two.flops_per_token(256)


def test_config_checks():
    with pytest.raises(ValueError, match=r"num_v_heads \(3\) must be a multiple of num_heads \(2\)"):
        product_config(num_v_heads=3)
    with pytest.raises(ValueError, match=r"expand_v \(1.1\) times head_dim \(8\) must be a whole number"):
        product_config(expand_v=1.1)
    assert product_config().mixers.gated_deltaproduct.tp_divides(product_config().d_model) == {
        "mixers.gated_deltaproduct.num_heads": 2
    }


# --- state tracking: parity -----------------------------------------------------------------


def parity_accuracy(n_h: int, allow_neg_eigval: bool, steps: int = 300, train_len: int = 32) -> dict[str, float]:
    """Train a one-block P model (mixer only, d_model 32, one head of 16) to output the running
    parity of a bit sequence at every position (AdamW 3e-3, batch 32, `steps` steps, fixed
    seeds); then its accuracy on fresh sequences: over the second half of the training length
    (a prefix of 16+ bits: past any short-conv window) and over every position of sequences 4x
    as long."""
    torch.manual_seed(0)
    section = dict(num_heads=1, head_dim=16, expand_v=1.0, num_householder=n_h, allow_neg_eigval=allow_neg_eigval)
    cfg = ModelConfig(pattern="P", d_model=32, vocab_size=2, mlp="none", tie_embeddings=False, mixers={"gated_deltaproduct": section})
    model = HybridLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        bits = torch.randint(0, 2, (32, train_len), generator=data)
        loss = F.cross_entropy(model(bits).flatten(0, 1), (bits.cumsum(1) % 2).flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = {}
    with torch.no_grad():
        for name, length, start in (("train_len", train_len, train_len // 2), ("4x_len", 4 * train_len, 0)):
            bits = torch.randint(0, 2, (256, length), generator=torch.Generator().manual_seed(2))
            right = model(bits).argmax(-1) == bits.cumsum(1) % 2
            accuracy[name] = right[:, start:].double().mean().item()
    return accuracy


@pytest.mark.slow
def test_two_householder_steps_with_negative_eigenvalues_learn_parity_one_positive_step_cannot():
    """The state-tracking claim, small: parity needs a transition with eigenvalue -1. n_h = 2 with
    beta in (0, 2) learns it (1.0 at the training length, ~0.96 at 4x; ~10 s on one thread);
    n_h = 1 with beta in (0, 1) (Gated DeltaNet) has only eigenvalues in [0, 1] and stays at
    chance past its first bits. (Parity needs only the negative eigenvalue: n_h = 1 with it learns
    parity too, n_h = 2 without it does not; what n_h >= 2 adds is rotations, e.g. counting mod 3, which we found too slow and
    seed-dependent to learn on CPU for a test.)"""
    product = parity_accuracy(n_h=2, allow_neg_eigval=True)
    gated_deltanet = parity_accuracy(n_h=1, allow_neg_eigval=False)
    print(f"parity accuracy: n_h=2 with negative eigenvalues {product}, n_h=1 without {gated_deltanet}")
    assert product["train_len"] > 0.95 and product["4x_len"] > 0.9
    assert gated_deltanet["train_len"] < 0.6 and gated_deltanet["4x_len"] < 0.6
