"""Context parallelism on CPU (gloo): per rank, the activation memory and the step time at cp 2 and
cp 4 against cp 1 at the same total sequence length, and the bytes each layer exchanges.

    python bench/context_parallel.py            # every mixer, d_model 128, one sequence of 4096 tokens
    python bench/context_parallel.py --tiny     # seconds: checks that the bench runs (the test's)

For each cp in (1, 2, 4), cp processes build the same seed-0 hybrid of every mixer in the registry
(float32), turn context parallelism on, and run forward and backward of the summed cross-entropy
on their piece of one batch (`parallel.context_parallel`: the same cut the train loop makes).
Measured per rank, the largest rank reported:
- activations: the bytes of the tensors autograd saves for backward (saved-tensors hooks, each
  storage once, parameters excluded), in all and by block. `N x ratio` is cp N's over cp 1's
  times N: 1 when a rank holds exactly its share; the goal is <= 1.1. What a rank holds beyond
  its share is context parallelism's own: attention's gathered keys and values and its queries'
  scores against them, the state summaries, and the op runs that produce them.
- peak: the peak of the allocations during forward and backward (the torch profiler's memory
  events), gradients and temporaries included.
- step time: forward + backward, median of `--reps` after a warm-up; on a shared 2-core machine
  cp 4 runs 4 processes on 2 cores, so its time is an upper bound.
- exchange: the bytes that reach a rank through collectives in one forward and backward, per
  block (a dispatch mode sees every collective; all-gather counts the other ranks' parts,
  reduce-scatter the parts summed into this rank's, send/recv the tensor, all-reduce its size).
Results: bench/results/context_parallel.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.config import ModelConfig  # noqa: E402
from models.mixers import PATTERN  # noqa: E402
from models.model import HybridLM  # noqa: E402
from parallel.context_parallel import apply_context_parallel, context_parallel  # noqa: E402
from pretrain.loss import lm_loss  # noqa: E402

CPS = (1, 2, 4)
GOAL = 1.1  # a rank's activations at cp N within GOAL / N of cp 1's
MIXERS = {  # small heads, so that a CPU runs every mixer at thousands of tokens
    "attention": {"num_heads": 4},
    "mamba2": {"head_dim": 32, "d_state": 32, "chunk_size": 64},
    "deltanet": {"num_heads": 4, "chunk_size": 64},
    "gated_deltanet": {"num_heads": 4, "head_dim": 32, "chunk_size": 64},
    "rwkv7": {"head_dim": 32, "decay_rank": 16, "a_rank": 16, "v_rank": 16, "gate_rank": 16, "chunk_size": 64},
    "mom": {"num_memories": 2, "topk": 1, "num_heads": 4, "head_dim": 32, "chunk_size": 64},
    "sse": {"num_heads": 4, "head_dim": 32, "num_partitions": 2, "chunk_size": 64},
    "gated_deltaproduct": {"num_heads": 4, "head_dim": 32, "chunk_size": 64},
}
TINY_MIXERS = {
    "attention": {"num_heads": 2},
    "mamba2": {"head_dim": 16, "d_state": 8, "chunk_size": 8},
    "deltanet": {"num_heads": 2, "chunk_size": 8},
    "gated_deltanet": {"num_heads": 2, "head_dim": 8, "chunk_size": 8},
    "rwkv7": {"head_dim": 16, "decay_rank": 8, "a_rank": 8, "v_rank": 8, "gate_rank": 8, "chunk_size": 8},
    "mom": {"num_memories": 2, "topk": 1, "num_heads": 2, "head_dim": 8, "chunk_size": 8},
    "sse": {"num_heads": 2, "head_dim": 8, "num_partitions": 2, "chunk_size": 8},
    "gated_deltaproduct": {"num_heads": 2, "head_dim": 8, "chunk_size": 8},
}
SIZES = {
    "full": dict(d_model=128, vocab_size=512, seq_len=4096, mixers=MIXERS),
    "tiny": dict(d_model=32, vocab_size=64, seq_len=64, mixers=TINY_MIXERS),
}


def model_config(size: dict[str, Any]) -> ModelConfig:
    """One block of every registered mixer (a new mixer is benched by its PATTERN line alone)."""
    mixers = size["mixers"] | {name: size["mixers"][name] | {"aux_loss_scale": 0} for name in ("mom", "sse")}
    return ModelConfig(
        pattern="".join(PATTERN), d_model=size["d_model"], vocab_size=size["vocab_size"], mlp_hidden=2 * size["d_model"], tie_embeddings=False, mixers=mixers,
    )


def full_batch(length: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence of `length` tokens with its labels and (row) cu_seqlens, the same on every rank."""
    tokens = torch.randint(0, vocab_size, (1, length + 1), generator=torch.Generator().manual_seed(length))
    return tokens[:, :-1], tokens[:, 1:], torch.tensor([0, length], dtype=torch.int32)


# ---- what a rank measures -------------------------------------------------------------------

def saved_activation_bytes(step: Callable[[], None], params: set[int], blocks: BlockTracker) -> dict[str, int]:
    """Bytes of the storages autograd saves for backward during `step` (each once, parameters
    not), by the block that saved them first."""
    saved: dict[int, tuple[str, int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in saved:
            saved[storage.data_ptr()] = (blocks.where, storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    by_block: dict[str, int] = defaultdict(int)
    for where, nbytes in saved.values():
        by_block[where.removesuffix(" forward")] += nbytes
    return dict(by_block)


def peak_allocated_bytes(step: Callable[[], None]) -> int:
    """The peak of what `step` allocates above what was held before it (the profiler's memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    allocated = peak = 0
    for event in events:
        allocated += event.nbytes()
        peak = max(peak, allocated)
    return peak


def received_bytes(func: Any, args: tuple, out: Any) -> int:
    """What reaches this rank through one collective (see the module docstring)."""
    name = str(func)

    def size(tensors: Any) -> int:
        if isinstance(tensors, torch.Tensor):
            return tensors.numel() * tensors.element_size()
        if isinstance(tensors, (list, tuple)):
            return sum(size(t) for t in tensors)
        return 0

    if "all_gather_into_tensor" in name and "_c10d_functional" in name:
        return size(args[0]) * (args[1] - 1)
    if "reduce_scatter_tensor" in name and "_c10d_functional" in name:
        return size(args[0]) * (args[2] - 1) // args[2]
    if "allgather" in name:  # c10d.allgather_ / _allgather_base_: (outputs, inputs, ...)
        return size(args[0]) - size(args[1])
    if "reduce_scatter" in name:  # c10d: (outputs, inputs, ...)
        return size(args[1]) - size(args[0])
    if "recv" in name or "all_reduce" in name or "allreduce" in name or "all_to_all" in name or "broadcast" in name:
        return size(args[0])
    return 0


class BlockTracker:
    """`where`: the block that runs (forward, or its backward), "outside blocks" between them."""

    def __init__(self, model: HybridLM) -> None:
        self.where = "outside blocks"
        for index, block in enumerate(model.blocks):
            label = f"{index} {PATTERN[block.kind]}"
            block.register_forward_pre_hook(lambda *_, label=label: self._at(f"{label} forward"))
            block.register_forward_hook(lambda *_: self._at("outside blocks"))
            block.register_full_backward_pre_hook(lambda *_, label=label: self._at(f"{label} backward"))
            block.register_full_backward_hook(lambda *_: self._at("outside blocks"))

    def _at(self, where: str) -> None:
        self.where = where


class ExchangeCounter(TorchDispatchMode):
    """Bytes received through collectives, by the block that was running (forward or backward)."""

    def __init__(self, blocks: BlockTracker) -> None:
        super().__init__()
        self.blocks = blocks
        self.bytes: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if "c10d" in str(func):
            self.bytes[self.blocks.where] += received_bytes(func, args, out)
        return out


def measure_rank(size: dict[str, Any], reps: int) -> dict[str, Any]:
    """This rank's figures (module docstring) under the cp of the process group (1: no group)."""
    torch.manual_seed(0)
    model = HybridLM(model_config(size))
    context = apply_context_parallel(model, dist.group.WORLD) if dist.get_world_size() > 1 else None  # cp 1: as the train loop runs it
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    batch = full_batch(size["seq_len"], size["vocab_size"])

    def step() -> None:  # a new piece per step, as the train loop cuts every batch
        input_ids, labels, cu_seqlens, piece = context.cut(*batch) if context is not None else (*batch, None)
        with contextlib.nullcontext() if piece is None else context_parallel(piece):
            lm_loss(model(input_ids, cu_seqlens=cu_seqlens), labels, reduction="sum").backward()

    step()  # warm-up
    blocks = BlockTracker(model)
    activations = saved_activation_bytes(step, params, blocks)
    peak = peak_allocated_bytes(step)
    times = []
    for _ in range(reps):
        dist.barrier()
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    counter = ExchangeCounter(blocks)
    with counter:
        step()
    model.zero_grad(set_to_none=True)
    return {"activations": activations, "peak": peak, "step_s": statistics.median(times), "exchange": dict(counter.bytes)}


# ---- running and reporting ------------------------------------------------------------------

def _worker(rank: int, world: int, tmp: str, size: dict[str, Any], reps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        torch.save(measure_rank(size, reps), os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)


def on_processes(world: int, size: dict[str, Any], reps: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, tmp, size, reps), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def summarise(cp: int, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The largest rank's figures; activations by block of the rank that holds most, exchange by
    block the most any rank receives there (the first rank receives no state, the last no gradient)."""
    activations = max((r["activations"] for r in ranks), key=lambda a: sum(a.values()))
    exchange = {w: max(r["exchange"].get(w, 0) for r in ranks) for w in {w for r in ranks for w in r["exchange"]}}
    return {
        "cp": cp, "activations_total": sum(activations.values()), "activations": activations, "peak": max(r["peak"] for r in ranks),
        "step_s": max(r["step_s"] for r in ranks), "exchange_total": max(sum(r["exchange"].values()) for r in ranks), "exchange": exchange,
    }


def report(rows: list[dict[str, Any]], size: dict[str, Any], reps: int) -> dict[str, Any]:
    one, MiB = rows[0], 2**20
    print(f"\ncontext parallelism, pattern {''.join(PATTERN)!r}, d_model {size['d_model']}, one sequence of {size['seq_len']} tokens, "
          f"float32, gloo, threads 1 per rank, step time median of {reps}; per rank, the largest rank")
    print(f"{'cp':>3} {'piece':>6} {'saved act MiB':>14} {'/cp1':>6} {'N x /cp1':>9} {'goal':>5} {'peak MiB':>9} {'/cp1':>6} "
          f"{'step s':>8} {'/cp1':>6} {'exchange MiB':>13}")
    for row in rows:
        ratio = row["activations_total"] / one["activations_total"]
        row |= {
            "activations_ratio": ratio, "activations_ratio_times_cp": ratio * row["cp"], "goal": GOAL, "peak_ratio": row["peak"] / one["peak"],
            "step_ratio": row["step_s"] / one["step_s"],
        }
        print(f"{row['cp']:>3} {size['seq_len'] // row['cp']:>6} {row['activations_total'] / MiB:>14.2f} {ratio:>6.3f} {ratio * row['cp']:>9.3f} "
              f"{GOAL:>5.2f} {row['peak'] / MiB:>9.2f} {row['peak_ratio']:>6.3f} {row['step_s']:>8.3f} {row['step_ratio']:>6.2f} "
              f"{row['exchange_total'] / MiB:>13.3f}")
    print("\nsaved activations by block: MiB at cp 1, and N x (cp N / cp 1)")
    print(f"{'':>24}{'cp 1 MiB':>10}" + "".join(f"{'N x cp ' + str(row['cp']):>12}" for row in rows[1:]))
    for where in sorted(one["activations"], key=_block_order):
        base = one["activations"][where]
        print(f"{where:>24}{base / MiB:>10.2f}" + "".join(f"{row['cp'] * row['activations'].get(where, 0) / base:>12.3f}" for row in rows[1:]))
    print("\nbytes received in one forward and backward, by block, the most of any rank (KiB)")
    where = sorted({w for row in rows[1:] for w in row["exchange"]}, key=_block_order)
    print(f"{'':>32}" + "".join(f"{'cp ' + str(row['cp']):>12}" for row in rows[1:]))
    for w in where:
        print(f"{w:>32}" + "".join(f"{row['exchange'].get(w, 0) / 1024:>12.1f}" for row in rows[1:]))
    return {"size": {k: v for k, v in size.items() if k != "mixers"}, "mixers": size["mixers"], "pattern": "".join(PATTERN), "reps": reps, "rows": rows}


def _block_order(where: str) -> tuple[int, str]:
    head = where.split(" ")[0]
    return (int(head), where) if head.isdigit() else (10**6, where)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a toy model and sequence: checks that the bench runs")
    parser.add_argument("--seq-len", type=int, default=None, help="total tokens of the sequence (default 4096; --tiny 64)")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per cp")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "context_parallel.json"))
    args = parser.parse_args(argv)
    size = dict(SIZES["tiny" if args.tiny else "full"])
    if args.seq_len is not None:
        size["seq_len"] = args.seq_len
    rows = []
    for cp in CPS:
        rows.append(summarise(cp, on_processes(cp, size, args.reps)))
        print(f"cp {cp}: done", flush=True)
    result = report(rows, size, args.reps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
