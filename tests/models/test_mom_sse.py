"""MoM ('O') and SSE ('S'): against step-recurrence references, routing and caches, capacity, aux
losses, the two SSE computations, the router's gradient, decoding, packed documents, training."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.config import ModelConfig
from models.layers.routing import switch_aux_loss
from models.model import HybridLM, build_mixer
from models.ops import recurrent_gated_delta_rule
from pretrain.config import ConfigError, load_config
from tests.mixer_checks import assert_close64, assert_decoding_matches_full_forward, assert_packed_documents_match_each_alone

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
D_MODEL = 32
SMALL = {
    "mom": {"num_memories": 3, "topk": 2, "num_heads": 2, "head_dim": 8, "chunk_size": 4},
    "sse": {"num_partitions": 3, "topk": 1, "num_heads": 2, "head_dim": 8, "chunk_size": 4},
}
SECTION = {"O": "mom", "S": "sse"}
CASES = [
    ("O", {}),
    ("O", {"shared_memory": False, "use_short_conv": False, "allow_neg_eigval": True}),
    ("S", {}),
    ("S", {"impl": "mask", "use_short_conv": True, "topk": 2}),
]
CASE_IDS = [kind + "".join(f"-{k}={v}" for k, v in opts.items()) for kind, opts in CASES]


def small_mixer(kind: str, seed: int = 0, **options) -> torch.nn.Module:
    """A float64 mixer whose outputs are O(1); norm weights perturbed so that they matter."""
    mixers = {name: dict(section) for name, section in SMALL.items()}
    mixers[SECTION[kind]].update(options)
    cfg = ModelConfig(pattern=kind, d_model=D_MODEL, init_std=0.2, rescale_residual=False, mixers=mixers)
    torch.manual_seed(seed)
    mixer = build_mixer(kind, cfg, layer_idx=0).double()
    with torch.no_grad():
        mixer.o_norm.weight.add_(0.3 * torch.randn_like(mixer.o_norm.weight))
        if kind == "O":  # MoM's paper init is small: widen it so that the routing and gates vary
            for m in mixer.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.mul_(8.0)
    return mixer


# --- MoM against a per-memory step recurrence -------------------------------------------------


def causal_conv(conv: torch.nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """SiLU(depthwise causal conv1d) of one stream x [T, C], with F.conv1d."""
    W = conv.kernel_size[0]
    y = F.conv1d(x.T[None], conv.weight, padding=W - 1, groups=x.shape[1])[0, :, : x.shape[0]]
    return F.silu(y.T)


def mom_reference(mixer, x: torch.Tensor, capacity: float | None = None) -> torch.Tensor:
    """One sequence x [T, d]: each memory's Gated DeltaNet, by the step recurrence, on the tokens
    routed to it (the last ceil(capacity*T/k) of them with a capacity), read-outs weighted by the
    renormalised top-k router probabilities and summed; then the gated norm and out_proj."""
    c = mixer.cfg
    H, K, V = c.num_heads, mixer.head_k_dim, mixer.head_v_dim
    probs = torch.softmax(x @ mixer.router.weight.T, dim=-1)
    top = probs.topk(c.topk, dim=-1)
    weights = torch.zeros_like(probs).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    if c.shared_memory:
        weights = torch.cat([weights, torch.ones_like(weights[:, :1])], dim=1)
    out = x.new_zeros(x.shape[0], H, V)
    for m, proj in enumerate(mixer.memories):
        tokens = weights[:, m].nonzero().squeeze(1)
        if capacity and m < c.num_memories:
            tokens = tokens[-math.ceil(capacity * x.shape[0] / c.topk) :]
        xs = x[tokens]
        q = mixer.q_proj(xs)
        k, v, b, a = proj(xs).view(-1, H, K + V + 2).split([K, V, 1, 1], dim=-1)  # stored head-major
        k, v, b, a = (t.flatten(1) for t in (k, v, b, a))
        if c.use_short_conv:
            q, k, v = causal_conv(mixer.q_conv1d, q), causal_conv(mixer.k_conv1d, k), causal_conv(mixer.v_conv1d, v)
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k = (t.view(-1, H, K) / (t.view(-1, H, K).pow(2).sum(-1, keepdim=True) + 1e-6).sqrt() for t in (q, k))
        g = -mixer.A_log.exp() * F.softplus(a + mixer.dt_bias)
        beta = b.sigmoid() * (2 if c.allow_neg_eigval else 1)
        o, _ = recurrent_gated_delta_rule(q[None], k[None], v.view(1, -1, H, V), g[None], beta[None], scale=K**-0.5)
        out[tokens] += weights[tokens, m, None, None] * o[0]
    o = mixer.o_norm(out, mixer.g_proj(x).view(-1, H, V))
    return mixer.out_proj(o.flatten(-2))


@pytest.mark.parametrize("options", [{}, {"shared_memory": False, "use_short_conv": False}, {"topk": 1}])
def test_mom_equals_each_memory_run_on_its_routed_tokens(options):
    mixer = small_mixer("O", **options)
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        actual = mixer(x)
        expected = torch.stack([mom_reference(mixer, row) for row in x])
        chosen = mixer.route(x.flatten(0, 1))[1]
    counts = torch.bincount(chosen.flatten(), minlength=mixer.cfg.num_memories)
    assert (counts > 0).all() and counts.max() < x.shape[0] * x.shape[1]  # every memory used, none by all
    assert actual.abs().max() > 0.1
    assert_close64(actual, expected)


def test_mom_capacity_keeps_the_last_routed_tokens_of_each_memory():
    """capacity 0.5, topk 2, 16 tokens: each memory sees its last ceil(0.5*16/2) = 4 routed tokens."""
    mixer = small_mixer("O", capacity=0.5)
    unlimited = small_mixer("O")
    x = torch.randn(1, 16, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        actual = mixer(x)[0]
        assert_close64(actual, mom_reference(mixer, x[0], capacity=0.5))
        assert (actual - unlimited(x)[0]).abs().max() > 1e-3  # some memory got more than 4 tokens
        mixer.cfg.capacity = 2.0  # ceil(2*16/2) = 16: nothing is dropped
        assert_close64(mixer(x)[0], unlimited(x)[0])


def test_mom_tokens_not_routed_to_a_memory_leave_its_state_and_conv_tail_unchanged():
    mixer = small_mixer("O")
    M, B = mixer.cfg.num_memories, 2
    x = torch.randn(B, 12, D_MODEL, dtype=torch.float64)
    cache: dict = {}
    advanced = 0
    with torch.no_grad():
        mixer(x[:, :3], cache=cache)
        for t in range(3, 12):
            before = {key: value.clone() for key, value in cache.items()}
            chosen = mixer.route(x[:, t])[1]
            mixer(x[:, t : t + 1], cache=cache)
            for m in range(M + 1):  # the shared memory (index M) advances on every token
                for b in range(B):
                    routed = m == M or m in chosen[b].tolist()
                    for key in ("state", "conv_q", "conv_k", "conv_v"):
                        same = torch.equal(cache[key][m * B + b], before[key][m * B + b])
                        assert same != routed, (t, m, b, key)
                    advanced += routed
    assert advanced == 9 * B * (mixer.cfg.topk + 1)


def test_mom_aux_loss_is_minimal_for_uniform_routing():
    """M sum_m f_m P_m is k at uniform routing and larger when skewed."""
    M, k, N = 4, 2, 8
    uniform = torch.full((N, M), 1 / M)
    balanced = torch.tensor([[0, 1], [2, 3]] * (N // 2))
    assert switch_aux_loss(uniform, balanced, M).item() == pytest.approx(k)
    skewed = torch.softmax(torch.tensor([3.0, 1.0, 0.0, 0.0]).expand(N, M), dim=-1)
    assert switch_aux_loss(skewed, skewed.topk(k).indices, M).item() > 1.5 * k
    mixer = small_mixer("O", num_memories=M, topk=k, aux_loss_scale=0.5)
    x = torch.randn(1, 10, D_MODEL, dtype=torch.float64)
    losses = []
    for router_weight in (torch.zeros_like(mixer.router.weight), mixer.router.weight * 10):
        carry: dict = {}
        with torch.no_grad():
            mixer.router.weight.copy_(router_weight)
            mixer(x, carry=carry)
        losses.append(carry["aux_loss"].item())
    assert losses[0] == pytest.approx(0.5 * k) and losses[1] > losses[0]


# --- SSE ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"topk": 2, "use_short_conv": True}])
def test_sse_varlen_equals_mask_outputs_and_gradients(options):
    varlen, mask = small_mixer("S", impl="varlen", **options), small_mixer("S", impl="mask", **options)
    x = torch.randn(2, 10, D_MODEL, dtype=torch.float64)
    for cu_seqlens in (None, torch.tensor([0, 3, 10, 14, 15, 20])):
        outputs = [mixer(x, cu_seqlens=cu_seqlens) for mixer in (varlen, mask)]
        assert_close64(outputs[0], outputs[1])
        for mixer, y in zip((varlen, mask), outputs):
            mixer.zero_grad()
            (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        for (name, p), q in zip(varlen.named_parameters(), mask.parameters()):
            assert_close64(p.grad, q.grad)
        assert varlen.router.weight.grad.abs().max() > 1e-6


def test_sse_router_learns_from_the_lm_loss_alone():
    """aux coefficient 0: nothing but the language-model loss reaches the router weight."""
    torch.manual_seed(0)
    mixers = {"sse": dict(SMALL["sse"], aux_loss_scale=0.0)}
    model = HybridLM(ModelConfig(pattern="SS", d_model=D_MODEL, vocab_size=64, mixers=mixers)).double()
    ids = torch.randint(0, 64, (2, 12))
    carry: dict = {}
    logits = model(ids[:, :-1], carry=carry)
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert "aux_loss" not in carry
    for block in model.blocks:
        assert block.mixer.router.weight.grad.abs().max() > 1e-8


def test_sse_aux_loss_is_one_at_uniform_routing():
    mixer = small_mixer("S", num_partitions=4, topk=2, aux_loss_scale=1.0)
    with torch.no_grad():
        mixer.router.weight.zero_()
        carry: dict = {}
        mixer(torch.randn(1, 8, D_MODEL, dtype=torch.float64), carry=carry)
    assert carry["aux_loss"].item() == pytest.approx(1.0)  # N/k sum_n (1/N)(k/N)


# --- both: decoding, packed documents, FLOPs, config --------------------------------------------


@pytest.mark.parametrize("kind, options", CASES, ids=CASE_IDS)
def test_decoding_matches_full_forward(kind, options):
    assert_decoding_matches_full_forward(small_mixer(kind, **options), D_MODEL)


@pytest.mark.parametrize("kind, options", CASES, ids=CASE_IDS)
def test_packed_documents_match_each_document_alone(kind, options):
    assert_packed_documents_match_each_alone(small_mixer(kind, **options), D_MODEL)


def test_flops_count_only_the_routed_work():
    mom = [small_mixer("O", topk=k, num_memories=4).flops_per_token(256) for k in (1, 2, 3)]
    assert mom[2] - mom[1] == pytest.approx(mom[1] - mom[0]) and mom[1] > mom[0]
    assert small_mixer("O", num_memories=8).flops_per_token(256) - small_mixer("O", num_memories=4).flops_per_token(256) == (
        pytest.approx(2 * D_MODEL * 4)  # more memories cost only the router
    )
    sse = {impl: small_mixer("S", impl=impl).flops_per_token(256) for impl in ("varlen", "mask")}
    assert sse["varlen"] == sse["mask"]
    assert small_mixer("S", num_partitions=8).flops_per_token(256) > sse["varlen"]  # router only


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.mixers.mom.topk=5", "model.mixers.mom: topk (5) must be <= num_memories (4)"),
        ("model.mixers.sse.topk=5", "model.mixers.sse: topk (5) must be <= num_partitions (4)"),
        ("model.mixers.sse.impl=dense", "model.mixers.sse.impl"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(REPO / "configs/mom_hybrid.yaml", [override])


# --- training -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("config", ["mom_hybrid", "sse_hybrid"])
def test_hybrid_trains_with_falling_loss_and_logs_aux_loss(tmp_path, config):
    tiny = [
        "model.d_model=64", "model.pattern=OOO*" if config == "mom_hybrid" else "model.pattern=SSS*",
        "model.mixers.attention.num_heads=2", "model.mixers.attention.num_kv_heads=1",
        f"model.mixers.{config[:3]}.num_heads=2", f"model.mixers.{config[:3]}.head_dim=16",
        f"model.mixers.{config[:3]}.chunk_size=16", "data.embedded_max_bytes=100000", "train.threads=1",
        "train.steps=10", "train.seq_len=64", "train.batch_size=4", "train.eval_interval=0", "optim.warmup_steps=2",
        "optim.lr=3e-3", "checkpoint.interval=0", "checkpoint.save_final=false", "logging.progress=false",
        "logging.tensorboard=false", f"train.run_dir={tmp_path}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pretrain.train", "--config", f"configs/{config}.yaml", *tiny],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    losses = [r["loss"] for r in records]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    aux = [r["aux_loss"] for r in records]
    # per layer aux_loss_scale * (k at uniform routing for MoM, 1 for SSE); 3 routed layers
    uniform = 3 * 0.01 * (2 if config == "mom_hybrid" else 1)
    assert all(math.isfinite(a) and uniform * 0.9 <= a < uniform * 4 for a in aux)
