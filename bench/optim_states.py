"""Low-bit optimizer states against what users would pick instead: optimizer-step time as a
multiple of torch's fused fp32 AdamW (same run), state bytes per parameter and peak memory, for
ebb's fp32, bf16, int8 and fp8 states, bitsandbytes' AdamW8bit and torchao's AdamW8bit and
AdamWFp8, on two parameter sets: a flat set of large tensors, and a model's parameter list
(many small tensors).

    python bench/optim_states.py                               # CPU, the quickstart model
    python bench/optim_states.py --device cuda --size 350m     # a ~350M-param hybrid on a GPU
    python bench/optim_states.py --tiny                        # seconds: a smoke run (the test's)
    python bench/optim_states.py --sets flat --threads 2       # the large-tensor goals: fp8 against
                                                               # torchao's AdamWFp8, int8 against the faster 8-bit library

Every optimizer has its own copy of the same parameters and fixed random gradients; its first
step creates the state (and compiles, for ebb's low-bit states: `optim.compile` auto), then
`--repeats` rounds step every optimizer once in turn, and the median is reported. ebb uses the
config's defaults (tensors under `optim.min_quant_numel` keep fp32 states, as bitsandbytes' and
torchao's do under 4096 elements; torchao also keeps fp32 states for tensors that are not whole
blocks). Bytes/param count the moments and their scales (not step counters or shared maps):
over all tensors, and over the tensors each optimizer quantises. Peak memory: of one optimizer
step (flat set) or one forward/backward/step of a --batch-size x --seq-len batch (model), after
warm-up steps: CUDA's max allocated bytes, or on CPU the peak resident set (its high-water mark
reset after warm-up) above the process's resident set before the parameters were made.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.config import ModelConfig  # noqa: E402
from models.model import HybridLM  # noqa: E402
from optim.adamw import build_optimizer  # noqa: E402
from optim.codecs import CODECS  # noqa: E402
from optim.config import OptimConfig  # noqa: E402
from pretrain.config import load_config  # noqa: E402

SIZE_350M = {"pattern": "MTG* " * 6, "d_model": 1024, "vocab_size": 32768, "tie_embeddings": True}
TINY_MODEL = [
    "model.d_model=64", "model.vocab_size=512", "model.mixers.attention.num_heads=2", "model.mixers.deltanet.num_heads=2",
    "model.mixers.mamba2.head_dim=16", "model.mixers.mamba2.d_state=16", "model.mixers.gated_deltanet.num_heads=2",
    "model.mixers.gated_deltanet.head_dim=16",
]
FLAT = [(2048, 2048)] * 4 + [(256, 1024)] * 16  # the set: 21M parameters
FLAT_TINY = [(64, 256)] * 2 + [(16, 256)] * 2
EBB = [f"ebb_{name}" for name in CODECS]  # ebb_fp32 steps fp32 parameters with torch's fused kernel
LIBRARIES = {"bnb_adamw8bit": "bitsandbytes", "torchao_adamw8bit": "torchao", "torchao_adamwfp8": "torchao"}
EIGHT_BIT_LIBRARIES = ("bnb_adamw8bit", "torchao_adamw8bit")
EIGHT_BIT_LABELS = {"bnb_adamw8bit": "bitsandbytes 8-bit", "torchao_adamw8bit": "torchao 8-bit"}


def configs(size: str) -> tuple[ModelConfig, OptimConfig]:
    cfg = load_config(REPO / "configs" / "quickstart.yaml", TINY_MODEL if size == "tiny" else [])
    if size == "350m":
        return cfg.model.model_copy(update=SIZE_350M), cfg.optim
    return cfg.model, cfg.optim


def flat_module(shapes: list[tuple[int, ...]], device: str) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    return nn.ParameterList([nn.Parameter(torch.randn(shape, generator=gen).to(device)) for shape in shapes])


def model_module(size: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    return HybridLM(configs(size)[0]).to(device)


def optimizer_for(name: str, module: nn.Module, optim_cfg: OptimConfig) -> torch.optim.Optimizer:
    hyper = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay, eps=optim_cfg.eps)
    params = list(module.parameters())
    if name == "torch_fused":
        return torch.optim.AdamW(params, fused=True, **hyper)
    if name == "bnb_adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **hyper)
    if name == "torchao_adamw8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, **hyper)
    if name == "torchao_adamwfp8":
        from torchao.optim import AdamWFp8

        return AdamWFp8(params, **hyper)
    return build_optimizer(module, optim_cfg.model_copy(update={"state_dtype": name.removeprefix("ebb_")}))


def available(names: list[str]) -> tuple[list[str], list[str]]:
    present = [n for n in names if n not in LIBRARIES or importlib.util.find_spec(LIBRARIES[n]) is not None]
    return present, [n for n in names if n not in present]


def fill_gradients(module: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for p in module.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(p.device, p.dtype)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


MAPS = ("qmap", "qmap1", "qmap2")  # bitsandbytes' and torchao's code maps, one per optimizer or shared


def _tensor_bytes(t: torch.Tensor, seen: set[int]) -> tuple[int, bool]:
    """Bytes of a state tensor (torchao's states are tensor subclasses: their inner tensors but
    the map), counting each storage once; and whether it holds 1-byte codes."""
    inner = [getattr(t, name) for name in t.__tensor_flatten__()[0] if name not in MAPS] if hasattr(t, "__tensor_flatten__") else [t]
    total, low_bit = 0, False
    for part in inner:
        if isinstance(part, torch.Tensor) and part.data_ptr() not in seen:
            seen.add(part.data_ptr())
            total += part.numel() * part.element_size()
            low_bit |= part.element_size() == 1
    return total, low_bit


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, float | None]:
    """Bytes of moments and scales per parameter: over all tensors, and over the quantised ones."""
    seen: set[int] = set()
    total_bytes = total_params = quant_bytes = quant_params = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            nbytes, low_bit = 0, False
            for key, value in optimizer.state[p].items():
                if isinstance(value, torch.Tensor) and key not in ("step", "master", *MAPS):
                    b, lb = _tensor_bytes(value, seen)
                    nbytes, low_bit = nbytes + b, low_bit or lb
            total_bytes, total_params = total_bytes + nbytes, total_params + p.numel()
            if low_bit:
                quant_bytes, quant_params = quant_bytes + nbytes, quant_params + p.numel()
    return {"bytes_per_param": total_bytes / total_params, "bytes_per_quantised_param": quant_bytes / quant_params if quant_params else None}


def step_times(names: list[str], make: Callable[[], nn.Module], optim_cfg: OptimConfig, device: str, repeats: int) -> dict[str, dict]:
    """Median optimizer-step seconds per optimizer over `repeats` rounds in which each steps once."""
    runs = {}
    for name in names:
        module = make()
        fill_gradients(module)
        optimizer = optimizer_for(name, module, optim_cfg)
        synchronize(device)
        began = time.perf_counter()
        optimizer.step()  # creates the state; compiles
        synchronize(device)
        runs[name] = (module, optimizer, time.perf_counter() - began, [])
    for _ in range(repeats):
        for name, (_, optimizer, _, times) in runs.items():
            synchronize(device)
            began = time.perf_counter()
            optimizer.step()
            synchronize(device)
            times.append(time.perf_counter() - began)
    return {
        name: {"step_ms": 1e3 * statistics.median(times), "first_step_s": first, **state_bytes(optimizer)}
        for name, (_, optimizer, first, times) in runs.items()
    }


def _status_mb(key: str) -> float:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def _release_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so that the resident set is what is live
        except OSError:
            pass


def peak_memory_mb(
    name: str, make: Callable[[], nn.Module], optim_cfg: OptimConfig, device: str, work: Callable[[nn.Module, torch.optim.Optimizer], None]
) -> float | None:
    """Peak memory of `work` (after two warm-up runs), parameters and states included."""
    _release_memory(device)
    if device == "cuda":
        base = torch.cuda.memory_allocated()
    elif Path("/proc/self/clear_refs").exists():
        base = _status_mb("VmRSS")
    else:
        return None
    module = make()
    optimizer = optimizer_for(name, module, optim_cfg)
    for _ in range(2):
        work(module, optimizer)
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        work(module, optimizer)
        synchronize(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        _release_memory(device)
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from here
        work(module, optimizer)
        peak = _status_mb("VmHWM") - base
    del module, optimizer
    return peak


def optimizer_step(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    fill_gradients(module)
    optimizer.step()


def training_step(batch: torch.Tensor) -> Callable[[nn.Module, torch.optim.Optimizer], None]:
    def run(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        logits = model(batch[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def ratios(rows: dict[str, dict]) -> None:
    """Each row's step time over torch's fused AdamW; int8 over the faster 8-bit library, fp8
    over torchao's AdamWFp8 (the goals)."""
    fused = rows["torch_fused"]["step_ms"]
    libraries = [n for n in EIGHT_BIT_LIBRARIES if n in rows]
    faster = min(libraries, key=lambda n: rows[n]["step_ms"]) if libraries else None
    for name, row in rows.items():
        row["vs_torch_fused"] = row["step_ms"] / fused
        if name == "ebb_int8" and faster:
            row["vs_library"], row["library"] = row["step_ms"] / rows[faster]["step_ms"], EIGHT_BIT_LABELS[faster]
        if name == "ebb_fp8" and "torchao_adamwfp8" in rows:
            row["vs_library"], row["library"] = row["step_ms"] / rows["torchao_adamwfp8"]["step_ms"], "torchao fp8"


def goals_line(rows: dict[str, dict]) -> str | None:
    """ebb's low-bit steps over their goals' libraries, from the rows that have them (`ratios`)."""
    parts = [f"ebb {name.removeprefix('ebb_')} {rows[name]['vs_library']:.2f}x {rows[name]['library']}"
             for name in ("ebb_fp8", "ebb_int8") if "vs_library" in rows.get(name, {})]
    return "goals: " + "; ".join(parts) if parts else None


def print_table(title: str, rows: dict[str, dict]) -> None:
    print(title)
    print(f"{'optimizer':<19}{'B/param':>8}{'B/quant.':>9}{'step ms':>10}{'vs fused':>9}{'vs library':>28}{'peak MB':>9}{'1st step s':>11}")
    for name, row in rows.items():
        quant = "-" if row["bytes_per_quantised_param"] is None else f"{row['bytes_per_quantised_param']:.3f}"
        library = f"{row['vs_library']:.2f}x {row['library']}" if "vs_library" in row else ""
        peak = "-" if row.get("peak_mb") is None else f"{row['peak_mb']:.0f}"
        print(f"{name:<19}{row['bytes_per_param']:>8.3f}{quant:>9}{row['step_ms']:>10.1f}{row['vs_torch_fused']:>8.2f}x{library:>28}{peak:>9}{row['first_step_s']:>11.1f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", choices=["quickstart", "350m"], default="quickstart", help="the model whose parameter list is the second set")
    parser.add_argument("--tiny", action="store_true", help="tiny tensors and model, 2 rounds: checks that the bench runs")
    parser.add_argument("--sets", default="flat,model", help="comma-separated: flat, model")
    parser.add_argument("--only", default=None, help="comma-separated optimizers (torch_fused always runs)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (after one step that creates the states)")
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="default bench/results/optim_states_<device>_<size>.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = "tiny" if args.tiny else args.size
    repeats = 2 if args.tiny else args.repeats
    batch_size, seq_len = (2, 16) if args.tiny else (args.batch_size, args.seq_len)
    names = ["torch_fused", *EBB, *LIBRARIES]
    if args.only:
        names = ["torch_fused", *(n for n in args.only.split(",") if n != "torch_fused")]
    names, missing = available(names)
    optim_cfg = configs(size)[1]
    flat_shapes = FLAT_TINY if args.tiny else FLAT
    sets = {
        "flat": (lambda: flat_module(flat_shapes, args.device), optimizer_step),
        "model": (lambda: model_module(size, args.device), None),
    }
    results: dict[str, dict] = {}
    for set_name in args.sets.split(","):
        make, work = sets[set_name]
        if work is None:
            vocab = configs(size)[0].vocab_size
            work = training_step(torch.randint(0, vocab, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(0)).to(args.device))
        rows = step_times(names, make, optim_cfg, args.device, repeats)
        ratios(rows)
        for name in names:
            rows[name]["peak_mb"] = None if args.no_peak else peak_memory_mb(name, make, optim_cfg, args.device, work)
        module = make()
        params, tensors = sum(p.numel() for p in module.parameters()), len(list(module.parameters()))
        what = "an optimizer step" if set_name == "flat" else f"a {batch_size}x{seq_len} training step"
        title = (f"{set_name} set ({'the ' + size + ' model' if set_name == 'model' else 'large tensors'}): {tensors} tensors, {params / 1e6:.1f}M params, "
                 f"{args.device}, threads {torch.get_num_threads()}, median of {repeats} alternated rounds; peak memory of {what}")
        print_table(title, rows)
        if goals := goals_line(rows):
            print(goals)
        if missing:
            print(f"not installed, not measured: {', '.join(missing)}")
        print()
        results[set_name] = {"tensors": tensors, "params": params, "rows": rows}
    out = Path(args.out or REPO / f"bench/results/optim_states_{args.device}_{size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": args.device, "size": size, "threads": torch.get_num_threads(), "repeats": repeats, "batch_size": batch_size,
              "seq_len": seq_len, "torch": torch.__version__, "missing": missing, "sets": results}
    out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
