"""Peak FLOP/s for model FLOPs utilization: a table of known GPUs, or a matmul measured on CPU."""
from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core peaks (no sparsity), matched in order against torch.cuda.get_device_name().
GPU_BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def gpu_peak_flops(device_name: str) -> float | None:
    """The bf16 dense peak of a recognised GPU, else None (MFU is then not reported)."""
    for key, peak in GPU_BF16_PEAK_FLOPS:
        if key in device_name:
            return peak
    return None


def measure_matmul_peak(size: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """The best FLOP/s of `repeats` CPU matmuls of size^3, with torch's current thread count.

    On shared CPUs there is no datasheet peak: this is what the same process can reach with
    the same threads, so MFU against it says how far the model is from dense-matmul speed.
    """
    rng = torch.Generator().manual_seed(0)  # leaves the global RNG (and so training) untouched
    a = torch.randn(size, size, dtype=dtype, generator=rng)
    b = torch.randn(size, size, dtype=dtype, generator=rng)
    torch.mm(a, b)  # warm-up: thread pool, allocator
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops(device: torch.device) -> float | None:
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    return measure_matmul_peak()
