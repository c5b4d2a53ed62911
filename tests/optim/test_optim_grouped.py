"""The grouped codec step (many tensors per call, `optim/buckets.py`) against the per-parameter
one (`bucket_numel=0`: one call per tensor): bit-identical parameters and states for every
codec, eager and compiled, with a parameter that has no gradient, tensors whose rows are not
whole blocks, bf16 parameters with master weights, per-glob overrides (several codecs in one
step), resume from a saved state, and FSDP2/TP DTensor shards (real gloo processes). Also: the
compiled step against the eager one (float32 rounding), compiling once and saying so, and
int8's branch-free code search against bucketize.

Compiled tests are few and small (each compiles a codec step, seconds on CPU)."""
from __future__ import annotations

import io
import re

import pytest
import torch
from torch import nn

from optim.adamw import AdamW, build_optimizer
from optim.codecs import CODECS, int8
from optim.config import OptimConfig, ParamGroupOverride
from tests.distributed import run_distributed

# rows of whole blocks, rows that are not (700, 300: padded), a 0-d and a 1-row tensor, and one
# large enough to be cut into slices by a small bucket
SHAPES = [(64, 512), (3, 700), (300,), (), (128, 128), (5, 1, 256), (2, 256), (1, 256)]
SMALL_BUCKET = 1000  # slices of the (64, 512) tensor, shared buckets for the rest
LOW_BIT = ["bf16", "int8", "fp8"]


def params(dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in SHAPES]


def set_grads(ps: list[nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(ps):
        grad = torch.randn(p.shape, generator=gen) * 1e-2
        p.grad = None if (i == 2 and step == 1) else grad.to(p.dtype)  # (300,) has no gradient in step 1


def run(state_dtype: str, bucket_numel: int, steps: int = 3, dtype: torch.dtype = torch.float32, **kwargs) -> tuple[list[nn.Parameter], AdamW]:
    ps = params(dtype)
    optimizer = AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_dtype=state_dtype, bucket_numel=bucket_numel, **kwargs)
    for step in range(steps):
        set_grads(ps, step)
        optimizer.step()
    return ps, optimizer


def assert_same(a: tuple[list[nn.Parameter], AdamW], b: tuple[list[nn.Parameter], AdamW]) -> None:
    (ps_a, opt_a), (ps_b, opt_b) = a, b
    for i, (pa, pb) in enumerate(zip(ps_a, ps_b)):
        assert torch.equal(pa, pb), f"parameter {i} {tuple(pa.shape)}"
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"parameter {i} {tuple(pa.shape)}: {key}"


@pytest.mark.parametrize("state_dtype", LOW_BIT)
def test_grouped_step_is_the_per_parameter_step_bit_for_bit(state_dtype):
    per_parameter = run(state_dtype, bucket_numel=0, compile=False)
    assert_same(run(state_dtype, bucket_numel=SMALL_BUCKET, compile=False), per_parameter)
    assert_same(run(state_dtype, bucket_numel=1 << 22, compile=False), per_parameter)
    assert per_parameter[1].state[per_parameter[0][2]]["step"] == 2  # the one without a gradient in step 1


@pytest.mark.parametrize("state_dtype", ["fp32", *LOW_BIT])
def test_bf16_parameters_with_master_weights_grouped_and_per_parameter(state_dtype):
    per_parameter = run(state_dtype, 0, dtype=torch.bfloat16, master_weights=True, compile=False)
    grouped = run(state_dtype, SMALL_BUCKET, dtype=torch.bfloat16, master_weights=True, compile=False)
    assert_same(grouped, per_parameter)
    ps, optimizer = grouped
    assert all(torch.equal(optimizer.state[p]["master"].to(torch.bfloat16), p) for p in ps)


def test_eager_step_is_the_reference_arithmetic():
    """The eager codec step is decode -> `adamw_update_` -> encode, per tensor (bitsandbytes'
    CPU update for int8, tests/optim/test_optim_codecs.py)."""
    from optim.adamw import adamw_update_

    for name in LOW_BIT:
        codec = CODECS[name]
        ps, optimizer = run(name, SMALL_BUCKET, steps=1, compile=False)
        reference = params()
        set_grads(reference, 0)
        for p, q in zip(ps, reference):
            m, v = codec.zeros(q.detach()), codec.zeros(q.detach())
            m_value, v_value, work = codec.decode(m, True), codec.decode(v, False), q.detach().clone()
            adamw_update_(work, q.grad, m_value, v_value, 1, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
            assert torch.equal(p, work), name
            for key, part in codec.encode(m_value, True).items():
                assert torch.equal(optimizer.state[p]["exp_avg" + key], part), (name, key)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(256, 512), nn.Linear(512, 300), nn.Linear(300, 256)
        self.norm = nn.LayerNorm(256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.c(torch.tanh(self.b(torch.tanh(self.a(x))))))


def train_net(net: Net, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x = torch.randn(8, 256, generator=torch.Generator().manual_seed(step))
        net(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


OVERRIDES = OptimConfig(
    lr=1e-2, state_dtype="int8", min_quant_numel=0, compile=False,
    overrides=[ParamGroupOverride(params="b.*", state_dtype="fp8", lr_scale=2.0), ParamGroupOverride(params="c.*", state_dtype="bf16")],
)


def test_overrides_mix_codecs_in_one_step_and_resume_grouped_as_per_parameter():
    """Three codecs (and lr scales) in one step; a grouped run saved after 2 steps and resumed
    in a fresh optimizer ends where an uninterrupted per-parameter run does."""
    straight = Net()
    per_parameter = build_optimizer(straight, OVERRIDES)
    per_parameter.bucket_numel = 0
    assert {g["state_dtype"] for g in per_parameter.param_groups} == {"int8", "fp8", "bf16"}
    train_net(straight, per_parameter, range(4))

    resumed = Net()
    grouped = build_optimizer(resumed, OVERRIDES)
    train_net(resumed, grouped, range(2))
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optim": grouped.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = Net()
    resumed.load_state_dict(saved["model"])
    grouped = build_optimizer(resumed, OVERRIDES)
    grouped.load_state_dict(saved["optim"])
    train_net(resumed, grouped, range(2, 4))

    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
        for key, value in per_parameter.state[a].items():
            assert torch.equal(value, grouped.state[b][key]), (name, key)


def shard_and_step(state_dtype: str) -> dict[str, list[torch.Tensor]]:
    """On each rank: parameters as DTensors sharded along dim 0 (FSDP2's layout) and along the
    last dim in whole blocks (a TP column split), three steps grouped and per parameter; the
    local shards of parameters and states of both."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    placements = [[Shard(0)], [Shard(1)], [Shard(0)], [Shard(0)]]
    shapes = [(64, 512), (8, 512), (6, 700), (2, 256)]  # (8, 512) split in its last dim: 256 per rank
    out: dict[str, list[torch.Tensor]] = {}
    for bucket_numel in (0, SMALL_BUCKET, 1 << 22):
        gen = torch.Generator().manual_seed(0)
        ps = [nn.Parameter(distribute_tensor(torch.randn(s, generator=gen), mesh, pl)) for s, pl in zip(shapes, placements)]
        optimizer = AdamW(ps, lr=1e-2, weight_decay=0.1, state_dtype=state_dtype, bucket_numel=bucket_numel, compile=False)
        for step in range(3):
            gen = torch.Generator().manual_seed(10 + step)
            for i, (p, s, pl) in enumerate(zip(ps, shapes, placements)):
                grad = torch.randn(s, generator=gen) * 1e-2
                p.grad = None if (i == 3 and step == 1) else distribute_tensor(grad, mesh, pl)
            optimizer.step()
        out[str(bucket_numel)] = [t.to_local().clone() for p in ps for t in (p, *optimizer.state[p].values()) if t.ndim > 0]
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("state_dtype", ["int8", "fp8"])
def test_dtensor_shards_grouped_as_per_parameter(state_dtype):
    for rank in run_distributed(shard_and_step, 2, state_dtype):
        per_parameter = rank["0"]
        for bucket in (str(SMALL_BUCKET), str(1 << 22)):
            assert len(rank[bucket]) == len(per_parameter)
            assert all(torch.equal(a, b) for a, b in zip(rank[bucket], per_parameter)), bucket


@pytest.mark.slow
def test_compiled_step_compiles_once_per_codec_says_so_and_matches_per_parameter(capfd):
    """Compiled: grouped == per-parameter bit for bit (fp32 and bf16 parameters, master
    weights), one compile per codec and dtypes whatever the bucket sizes and learning rates
    (the log says so, once each), and within float32 rounding of the eager step."""
    compiles = torch._dynamo.utils.counters["stats"]
    for name in LOW_BIT:
        per_parameter = run(name, 0, compile=True)
        before = compiles["unique_graphs"]
        grouped = run(name, SMALL_BUCKET, compile=True)  # new sizes, lrs and step counts: no new graph
        assert compiles["unique_graphs"] == before, name
        assert_same(grouped, per_parameter)
        eager_ps, _ = run(name, SMALL_BUCKET, compile=False)
        for a, b in zip(grouped[0], eager_ps):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-3)  # lr 1e-2: a code that rounds the other way moves a weight by ~1e-4
    assert_same(run("int8", SMALL_BUCKET, dtype=torch.bfloat16, master_weights=True, compile=True),
                run("int8", 0, dtype=torch.bfloat16, master_weights=True, compile=True))
    said = re.findall(r"ebb: compiled the (\w+) optimizer step \((\d+) tensors, (\w+) target, (\w+) gradients, cpu\) in [\d.]+s", capfd.readouterr().out)
    assert sorted(said) == sorted([(name, "8", "float32", "float32") for name in LOW_BIT] + [("int8", "8", "float32", "bfloat16")])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("state_dtype", LOW_BIT)
def test_compiled_step_on_cuda_is_per_parameter_and_tracks_cpu(state_dtype):
    """Triton: grouped = per-parameter bit for bit; against the eager CPU step, parameters
    within what a code rounding the other way moves them."""
    def on_cuda(bucket_numel: int) -> tuple[list[nn.Parameter], AdamW]:
        ps = [nn.Parameter(p.detach().cuda()) for p in params()]
        optimizer = AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_dtype=state_dtype, bucket_numel=bucket_numel, compile=True)
        for step in range(3):
            cpu = params()
            set_grads(cpu, step)
            for p, q in zip(ps, cpu):
                p.grad = None if q.grad is None else q.grad.cuda()
            optimizer.step()
        return ps, optimizer

    grouped, per_parameter = on_cuda(SMALL_BUCKET), on_cuda(0)
    assert_same(grouped, per_parameter)
    for a, b in zip(grouped[0], run(state_dtype, SMALL_BUCKET, compile=False)[0]):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=0, atol=1e-3)


def test_compile_auto_compiles_where_it_pays():
    small = AdamW([nn.Parameter(torch.zeros(64, 256))], state_dtype="int8")
    large = AdamW([nn.Parameter(torch.zeros(1024, 1024))], state_dtype="int8")
    torch_route = AdamW([nn.Parameter(torch.zeros(1024, 1024))], state_dtype="fp32")  # torch's fused kernel: nothing to compile
    cpu = torch.device("cpu")
    assert not small._stepper.compiles(cpu) and large._stepper.compiles(cpu) and not torch_route._stepper.compiles(cpu)
    assert not AdamW([nn.Parameter(torch.zeros(1024, 1024))], state_dtype="int8", compile=False)._stepper.compiles(cpu)
    assert build_optimizer(nn.Linear(4, 4), OptimConfig(compile=True))._stepper.compiles(cpu)


def test_a_step_that_fails_to_compile_runs_eagerly_when_compiling_was_auto(monkeypatch, capfd):
    from optim import adamw, buckets

    def no_compiler(fn):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler found\nmore")
        return fail

    monkeypatch.setattr(buckets, "_compiled", no_compiler)
    monkeypatch.setattr(buckets, "ALONE_NUMEL", {"cpu": 0})  # every tensor its own call: the warning still comes once
    monkeypatch.setattr(adamw, "AUTO_COMPILE_NUMEL", 0)
    auto = run("int8", SMALL_BUCKET, steps=2, compile=None)
    assert_same(run("int8", SMALL_BUCKET, steps=2, compile=False), auto)
    warnings = re.findall(r"ebb: warning: compiling the int8 optimizer step failed \(RuntimeError: no C\+\+ compiler found\); it steps eagerly on cpu", capfd.readouterr().err)
    assert len(warnings) == 1
    with pytest.raises(RuntimeError, match="no C"):
        run("int8", SMALL_BUCKET, steps=1, compile=True)


SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1.17e-38, 2.0**-31, -(2.0**-30), 3e-7, 5.5e-7, 1e-6, 1e-5, 0.1, 0.09999, 0.5, 0.99, 0.9999999]


@pytest.mark.parametrize("signed", [True, False], ids=["m-signed", "v-unsigned"])
def test_int8_code_search_is_bucketize(signed):
    """`_nearest_codes` (the compiled encoder's) finds the codes `torch.bucketize` does: at
    every map entry and midpoint, one float either side of each, special values, and random
    values over nine decades (every float32 in [2^-30, 1]: the slow test below)."""
    midpoints = int8.lookup_tables("cpu")["mid_m" if signed else "mid_v"]
    entries = int8.dynamic_map(signed)
    inner = midpoints[1:-1]
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([
        entries, inner, torch.nextafter(inner, torch.tensor(2.0)), torch.nextafter(inner, torch.tensor(-2.0)), torch.tensor(SPECIAL),
        torch.exp(-20 * torch.rand(200_000, generator=gen)), torch.rand(200_000, generator=gen),
    ])
    values = values.clamp(-1, 1)
    if signed:
        values = torch.cat([values, -values])
    else:
        values = values.abs()
    assert torch.equal(int8._nearest_codes(values, signed, midpoints), torch.bucketize(values, inner, out_int32=True))


@pytest.mark.slow
@pytest.mark.parametrize("signed", [True, False], ids=["m-signed", "v-unsigned"])
def test_int8_code_search_is_bucketize_for_every_float32_in_range(signed):
    """Compiled, as the step runs it (and 30x faster than eager over these 250M values)."""
    midpoints = int8.lookup_tables("cpu")["mid_m" if signed else "mid_v"]
    nearest_codes = torch.compile(int8._nearest_codes, dynamic=False)
    low, high = torch.tensor(2.0**-30).view(torch.int32).item(), torch.tensor(1.0).view(torch.int32).item()
    for start in range(low, high + 1, 1 << 24):
        values = torch.arange(start, min(start + (1 << 24), high + 1), dtype=torch.int32).view(torch.float32)
        for x in (values, -values) if signed else (values,):
            assert torch.equal(nearest_codes(x, signed, midpoints), torch.bucketize(x, midpoints[1:-1], out_int32=True))
