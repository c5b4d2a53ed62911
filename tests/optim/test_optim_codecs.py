"""State codecs: round-trip error bounds per block, bitsandbytes' map and update on CPU, zeros,
shapes, and the fp8 codec under torch.compile."""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from optim.adamw import adamw_update_
from optim.codecs import CODECS, fp8, int8

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")


def heavy_tailed(shape: tuple[int, ...], signed: bool, seed: int = 0) -> torch.Tensor:
    """Adam-moment-like data: log-normal magnitudes (a few decades per block), random signs for m."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.exp(1.5 * torch.randn(shape, generator=gen)) * 1e-3
    return x * torch.randn(shape, generator=gen).sign() if signed else x


@pytest.mark.parametrize("signed", [True, False], ids=["m-signed", "v-unsigned"])
def test_int8_round_trip_error_within_half_the_map_spacing(signed):
    x = heavy_tailed((6, 700), signed)  # 700: the last block of each row is short
    codes, absmax = int8.quantize(x, signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and absmax.shape == (6, 3)
    blocks = torch.nn.functional.pad(x, (0, 68)).view(6, 3, 256)
    assert torch.equal(absmax, blocks.abs().amax(-1))
    qmap = int8.dynamic_map(signed)
    normed = (blocks / absmax.unsqueeze(-1)).flatten(1)[:, :700]
    upper = torch.searchsorted(qmap, normed.contiguous()).clamp(1, 255)
    half_gap = (qmap[upper] - qmap[upper - 1]) / 2
    block_absmax = absmax.repeat_interleave(256, dim=1)[:, :700]
    error = (int8.dequantize(codes, absmax, signed) - x).abs()
    assert (error <= half_gap * block_absmax * (1 + 1e-5) + 1e-12).all()
    assert error.max() > 0  # the bound is tight enough to matter: values are not all exact


def test_fp8_range_expansion_beats_plain_e4m3_on_second_moments():
    v = heavy_tailed((64, 1024), signed=False)
    codes, scale, k, centre = fp8.quantize(v)
    assert codes.dtype == torch.uint8 and scale.shape == k.shape == centre.shape == (64, 8)
    assert torch.equal(k * 16, (k * 16).round()) and (k > 1).any()  # multiples of 1/16; ranges expanded
    expanded_mse = (fp8.dequantize(codes, scale, k, centre) - v).pow(2).mean()
    plain_mse = (fp8.plain_e4m3_roundtrip(v) - v).pow(2).mean()
    assert expanded_mse < 0.75 * plain_mse


def test_fp8_round_trip_relative_error_per_group():
    """x = sign(q) |q s|^(1/k) c, so a relative error e of the E4M3 code q becomes at most
    (1 + e)^(1/k) - 1 of x; e <= 2^-4 for normal codes (3 mantissa bits) and, below 2^-6, half the
    subnormal step 2^-9 over the smallest unrounded |q| that rounds to the code."""
    m = heavy_tailed((8, 300), signed=True)
    codes, scale, k, centre = fp8.quantize(m)
    decoded = fp8.dequantize(codes, scale, k, centre)
    assert torch.equal(decoded.sign(), m.sign())
    q = codes.view(fp8.E4M3).float().abs()
    code_error = torch.maximum(torch.full_like(q, 2**-4), 2**-10 / (q - 2**-10))
    group_k = k.repeat_interleave(fp8.GROUP, dim=1)[:, :300]
    bound = (1 + code_error).pow(1 / group_k) - 1
    assert ((decoded - m).abs() / m.abs() <= bound * 1.01).all()


def test_fp8_groups_of_tiny_values_round_trip_finite():
    """A second moment's group can span 1e-10 to 1e-40 (a rarely seen token's embedding row):
    M m underflows float32, which once made the centre 0 and the scale infinite (NaN codes)."""
    v = torch.tensor([[1e-10, 3e-25, 1e-40, 0.0] * 32, [1e-39, 1e-45, 0.0, 2e-44] * 32])
    codes, scale, k, centre = fp8.quantize(v)
    decoded = fp8.dequantize(codes, scale, k, centre)
    assert decoded.isfinite().all() and (centre > 0).all() and scale.isfinite().all()
    assert torch.equal(decoded == 0, v == 0)
    assert ((decoded - v).abs() <= 0.5 * v.abs()).all()


@pytest.mark.parametrize("name", list(CODECS))
def test_every_codec_stores_zero_as_zero_and_names_its_parts(name):
    codec = CODECS[name]
    x = torch.zeros(3, 130)
    parts = codec.zeros(x)
    assert set(parts) == set(codec.suffixes)
    codec.encode_(x, parts, signed=True)
    assert torch.equal(codec.decode(parts, signed=True), x)
    y = heavy_tailed((3, 130), signed=True)
    codec.encode_(y, parts, signed=True)
    assert ((codec.decode(parts, signed=True) - y).abs() <= 0.07 * y.abs().max()).all()


@needs_bnb
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_are_bitsandbytes_maps(signed):
    import bitsandbytes.functional as bnb_functional

    assert torch.equal(int8.dynamic_map(signed), bnb_functional.create_dynamic_map(signed=signed))


@needs_bnb
def test_pure_pytorch_int8_step_gives_bitsandbytes_states_on_cpu():
    """One AdamW step from the same 8-bit states through bitsandbytes' CPU kernel and ours.
    bitsandbytes' CPU quantiser finds the entry by an approximate bin search (it also writes -1
    into entry 0 of the map it is given); ours takes the nearest entry. So: identical absmax,
    identical parameters, and identical codes wherever bitsandbytes picked the nearest entry
    (nearly everywhere); where it did not, our decoded state is the closer one."""
    import bitsandbytes.functional as bnb_functional

    gen = torch.Generator().manual_seed(0)
    param, grad = torch.randn(64, 512, generator=gen), torch.randn(64, 512, generator=gen) * 1e-2
    m0, v0 = heavy_tailed((64, 512), True, seed=1), heavy_tailed((64, 512), False, seed=2) ** 2
    ours = {"p": param.clone(), "m": int8.quantize(m0, True), "v": int8.quantize(v0, False)}
    theirs = copy.deepcopy(ours)
    hyper = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    step = 3

    m_value, v_value = int8.dequantize(*ours["m"], True), int8.dequantize(*ours["v"], False)
    adamw_update_(ours["p"], grad, m_value, v_value, step, **hyper)
    ours["m"], ours["v"] = int8.quantize(m_value, True), int8.quantize(v_value, False)

    (m_codes, m_absmax), (v_codes, v_absmax) = theirs["m"], theirs["v"]
    bnb_functional.optimizer_update_8bit_blockwise(
        "adam", grad, theirs["p"], m_codes, v_codes, 0.9, 0.95, 0.0, 0.0, 1e-8, step, 1e-3,
        int8.dynamic_map(True).clone(), int8.dynamic_map(False).clone(), m_absmax.view(-1), v_absmax.view(-1), weight_decay=0.1,
    )
    assert torch.equal(ours["p"], theirs["p"])
    for (codes, absmax), (bnb_codes, bnb_absmax), exact, signed in [
        (ours["m"], (m_codes, m_absmax), m_value, True), (ours["v"], (v_codes, v_absmax), v_value, False)
    ]:
        assert torch.equal(absmax, bnb_absmax)
        same = codes == bnb_codes
        assert same.float().mean() > 0.8
        our_error = (int8.dequantize(codes, absmax, signed) - exact).abs()
        their_error = (int8.dequantize(bnb_codes, bnb_absmax, signed) - exact).abs()
        assert (our_error[~same] <= their_error[~same]).all()
        nearest = (int8.dequantize(bnb_codes, bnb_absmax, signed) - exact).abs() <= our_error
        assert torch.equal(same, nearest | same)


@pytest.mark.slow
def test_fp8_quantize_compiles_to_one_graph_with_the_same_result():
    """Inductor may reorder float ops, so scales agree to float32 rounding and a code may land
    on the neighbouring E4M3 value at a rounding boundary."""
    x = heavy_tailed((4, 256), signed=True)
    compiled = torch.compile(fp8.quantize, fullgraph=True, dynamic=False)
    (codes, *scales), (want_codes, *want_scales) = compiled(x), fp8.quantize(x)
    for got, want in zip(scales, want_scales):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert (codes == want_codes).float().mean() > 0.99
    torch.testing.assert_close(fp8.dequantize(codes, *scales), fp8.dequantize(want_codes, *want_scales), rtol=0.07, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_BNB, reason="needs CUDA and bitsandbytes")
def test_int8_on_cuda_takes_bitsandbytes_kernel_and_tracks_the_pure_pytorch_path():
    """Three steps on the same gradients: bitsandbytes' fused CUDA kernel (GPU copy) and the pure
    PyTorch path (CPU copy) keep the same absmax to float32 rounding, nearly all the same codes,
    and parameters within a small fraction of one step's size."""
    from optim.adamw import AdamW

    gen = torch.Generator().manual_seed(0)
    cpu = torch.nn.Parameter(torch.randn(64, 512, generator=gen))
    gpu = torch.nn.Parameter(cpu.detach().cuda())
    assert int8.bnb_can_update(gpu) and not int8.bnb_can_update(cpu)
    optimizers = [AdamW([p], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, state_dtype="int8") for p in (cpu, gpu)]
    for _ in range(3):
        grad = torch.randn(64, 512, generator=gen) * 1e-2
        for p, optimizer in zip((cpu, gpu), optimizers):
            p.grad = grad.to(p.device)
            optimizer.step()
    torch.testing.assert_close(gpu.detach().cpu(), cpu.detach(), rtol=0, atol=1e-4)
    cpu_state, gpu_state = (optimizer.state[p] for p, optimizer in zip((cpu, gpu), optimizers))
    for key in ("exp_avg_int8_absmax", "exp_avg_sq_int8_absmax"):
        torch.testing.assert_close(gpu_state[key].cpu(), cpu_state[key], rtol=1e-5, atol=0)
    for key in ("exp_avg_int8", "exp_avg_sq_int8"):
        assert (gpu_state[key].cpu() == cpu_state[key]).float().mean() > 0.95
