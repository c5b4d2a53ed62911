"""Interleaved optimizer offload (`optim.offload`): building `OffloadAdamW` from the config, with
what it decides at start-up (the host optimizer, k, the staging slots) measured and said in one
line of the run's header."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from common.processes import is_main_process
from common.tensors import local_shard
from optim.buckets import Member, Stepper
from optim.codecs import CODECS
from optim.offload.device import host_empty
from optim.offload.host import HOST_OPTIMIZERS, HostAdamW, HostUnavailable, build_host
from optim.offload.model import STATE_BYTES, Rates, choose_k
from optim.offload.optimizer import OffloadAdamW, OffloadError, cut

__all__ = ["OffloadAdamW", "OffloadError", "build_offload_optimizer"]

# `host_optimizer: auto` takes another host optimizer than torch's only when it measures this much
# faster: on the 2-core CPU here the two were within 1% of each other (4M-64M elements), and a
# choice by noise would change the run's numerics from one start to the next.
AUTO_MARGIN = 1.1
PROBE_NUMEL = 1 << 22  # elements per start-up measurement of the device and the link (or a subgroup, if smaller)
HOST_PROBE_NUMEL = 1 << 24  # elements per host measurement: past the caches, as a subgroup's update in a step (its state is cold)
HOST_ROUNDS = 5  # alternated rounds per host optimizer; the median decides
GiB = 1 << 30


def _best_time(fn: Callable[[], None], sync: Callable[[], None], repeats: int = 3) -> float:
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - began)
    return max(best, 1e-9)


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def host_rate(host: HostAdamW, numel: int, state: tuple[Tensor, ...] | None = None) -> float:
    """Elements per second `host` updates (fp32 master, gradient, moments of `numel` elements;
    `state`: those four, made once for several measurements)."""
    master, grad, m, v = state or probe_state(numel)
    step = torch.ones(())
    return numel / _best_time(lambda: host.update([master], [grad], [m], [v], [step], lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), lambda: None)


def probe_state(numel: int) -> tuple[Tensor, ...]:
    """Random fp32 master, gradient and moments of `numel` elements on the host."""
    return tuple(torch.rand(numel) for _ in range(4))


def device_rate(device: torch.device, numel: int, stepper: Stepper) -> float:
    """Elements per second ebb's grouped fp32 step updates on `device`."""
    target, grad, m, v, param = (torch.rand(numel, device=device) for _ in range(5))
    member = Member(target, grad, {"": m}, {"": v}, param)
    hyper = dict(step=1, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    return numel / _best_time(lambda: stepper.step(CODECS["fp32"], [member], hyper, None), _sync(device))


def bandwidth(device: torch.device, numel: int) -> float:
    """Bytes per second of the slower direction between (pinned) host memory and `device`."""
    host = host_empty(numel, torch.float32, device.type == "cuda").fill_(1.0)
    there = torch.empty(numel, device=device)
    up = _best_time(lambda: there.copy_(host, non_blocking=True), _sync(device))
    down = _best_time(lambda: host.copy_(there, non_blocking=True), _sync(device))
    return 4 * numel / max(up, down)


def host_throughputs(numel: int = HOST_PROBE_NUMEL, rounds: int = HOST_ROUNDS) -> dict[str, float | str]:
    """Elements/s of each host optimizer on `numel` elements, the median of `rounds` rounds taken
    in turn (so that a busy moment of the machine does not pick one), or why it cannot run here."""
    rates: dict[str, float | str] = {}
    hosts: dict[str, HostAdamW] = {}
    for name in HOST_OPTIMIZERS:
        try:
            hosts[name] = build_host(name)
        except HostUnavailable as exc:
            rates[name] = str(exc)
    samples: dict[str, list[float]] = {name: [] for name in hosts}
    state = probe_state(numel) if hosts else None
    for _ in range(rounds):
        for name, host in hosts.items():
            samples[name].append(host_rate(host, numel, state))
    return {name: statistics.median(samples[name]) if name in hosts else rates[name] for name in HOST_OPTIMIZERS}


def choose_host(name: str, numel: int = HOST_PROBE_NUMEL) -> tuple[str, dict[str, float | str]]:
    """`name`, or for `auto` the fastest host optimizer that runs here (torch's unless another is
    `AUTO_MARGIN` times faster); with, for `auto`, each one's measured throughput (elements/s) or
    why it cannot run."""
    if name != "auto":
        return name, {}
    rates = host_throughputs(numel)
    runnable = {n: r for n, r in rates.items() if isinstance(r, float)}
    return max(runnable, key=lambda n: runnable[n] / (1.0 if n == "torch" else AUTO_MARGIN)), rates


def measure_rates(host_measured: float | None, host: HostAdamW, device: torch.device, probe: int, compile: bool | None) -> Rates:
    """The performance model's inputs, measured here (the host's unless `host_measured` already)."""
    stepper = Stepper(compile, lambda d: d.type == "cuda")
    return Rates(host_measured or host_rate(host, HOST_PROBE_NUMEL), device_rate(device, probe, stepper), bandwidth(device, probe))


def host_optimizer(name: str) -> HostAdamW:
    try:
        return build_host(name)
    except HostUnavailable as exc:
        raise OffloadError(f"optim.offload.host_optimizer={name}: {exc}") from None


def _agree(value: Any) -> Any:
    """Rank 0's `value` on every rank (the measurements differ a little from rank to rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def staging_slots(cfg: Any, device: torch.device, subgroup_numel: int) -> int:
    """Subgroup states the device holds at once: 2 (prefetch beside update), else 1."""
    need = STATE_BYTES * subgroup_numel
    if cfg.device_memory_gb is not None:
        free = cfg.device_memory_gb * GiB
    elif device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        return 2
    if free < need:
        raise OffloadError(
            f"optim.offload.subgroup_size={cfg.subgroup_size}: one subgroup's fp32 master and moments take {need / GiB:.3g} GiB "
            f"of accelerator memory, {free / GiB:.3g} GiB {'allowed' if cfg.device_memory_gb is not None else 'free'}; lower optim.offload.subgroup_size"
        )
    return 2 if free >= 2 * need else 1


def _rate(value: float, unit: str) -> str:
    return f"{value / 1e9:.3g} G{unit}/s"


def build_offload_optimizer(model: nn.Module, groups: list[dict[str, Any]], opt: Any, on_device: torch.optim.Optimizer | None = None) -> OffloadAdamW:
    """`OffloadAdamW` over `groups` (of `model`'s parameters) as `opt` (OptimConfig) says, the
    low-bit ones `on_device`'s (ebb's AdamW over those group dicts); its `header` is the line the
    run prints about it."""
    cfg = opt.offload
    params = [p for g in groups for p in g["params"]]
    device = local_shard(params[0]).device if params else torch.device("cpu")
    probe = min(cfg.subgroup_size, PROBE_NUMEL)
    subgroups, total = cut(groups, cfg.subgroup_size, 0)
    param_bytes = max((p.element_size() for p in params), default=4)
    name, host_rates = _agree(choose_host(cfg.host_optimizer) if is_main_process() else None)  # rank 0 measures, all agree
    host = host_optimizer(name)
    notes = [f"host {name}" + (" (" + ", ".join(_describe_rate(n, r) for n, r in host_rates.items()) + ")" if host_rates else "")]
    if cfg.gpu_every_k == "auto" and device.type == "cpu":
        k = 0
        notes.append("k=0 (auto: without an accelerator nothing runs beside the host's updates)")
    elif cfg.gpu_every_k == "auto":
        rates = _agree(measure_rates(host_rates.get(name), host, device, probe, opt.compile) if is_main_process() else None)
        k = choose_k(rates, cfg.subgroup_size, len(subgroups), param_bytes)
        notes.append(f"k={k} from host {_rate(rates.host, 'param')}, device {_rate(rates.device, 'param')}, transfers {_rate(rates.bandwidth, 'B')}")
    else:
        k = cfg.gpu_every_k
        notes.append(f"k={k} (optim.offload.gpu_every_k)")
    slots = staging_slots(cfg, device, min(cfg.subgroup_size, total)) if k else 0
    optimizer = OffloadAdamW(
        groups, host, device, cfg.subgroup_size, k, slots, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
        compile=opt.compile, on_device=on_device,
    )
    on_accelerator = sum(s.on_device for s in optimizer.subgroups)
    where = "no accelerator, host and device are both the CPU; " if device.type == "cpu" else ""
    optimizer.header = (
        f"ebb: offload: {where}{_count(total)} elements in {len(optimizer.subgroups)} subgroups of {_count(cfg.subgroup_size)}, "
        f"{on_accelerator} on the {'accelerator' if device.type != 'cpu' else 'device side'}; " + "; ".join(notes) + _low_bit_note(groups)
    )
    return optimizer


def _low_bit_note(groups: list[dict[str, Any]]) -> str:
    kept = sum(local_shard(p).numel() for g in groups if g.get("state_dtype", "fp32") != "fp32" for p in g["params"])
    return f"; low-bit states of {_count(kept)} elements stay on the accelerator" if kept else ""


def _count(n: int) -> str:
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _describe_rate(name: str, rate: Any) -> str:
    return f"{name} {_rate(rate, 'param')}" if isinstance(rate, float) else f"{name}: {rate}"
