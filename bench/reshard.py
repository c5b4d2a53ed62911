"""Resuming a checkpoint with int8 optimizer states under another layout, against the same one:
the load's time and the peak host memory of the processes (CPU, gloo, 2 processes), and the
optimizer state's bytes on disk against its bytes in memory.

    python bench/reshard.py                 # ~0.95B parameters: 16 attention + SwiGLU blocks, d_model 2048
    python bench/reshard.py --layers 8      # smaller, where memory is short
    python bench/reshard.py --tiny          # seconds: checks that the bench runs (the test's)

Two processes save the model and its int8 AdamW states under dp_shard=2 (FSDP2), once. Then, in
`--rounds` alternated rounds, two fresh processes build the model under dp_shard=2 (the same
layout) or tp=2 (another: every matrix split the other way, so each loaded shard is pieced
together from both saved shards) and resume it as a run does: verify the files against the
manifest, then DCP-load model and optimizer into the fresh ones (which first creates the states
by a zero step, as `--resume` does). Each process builds its model on the meta device and
allocates only its own shards. Reported: the load's and the verification's seconds (the slower
rank), the processes' peak resident memory (the larger; it includes the model and states
themselves) and the load's own peak above what the process held before it, each median of the
rounds and as changed / same. On-disk bytes of the optimizer state (DCP's stored extents of the
`optimizer.state.*` entries) against the in-memory bytes of one replica's states (both ranks'
local shards). Results: bench/results/reshard.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from checkpoint import Ranks, build_checkpointer, dcp  # noqa: E402
from checkpoint.manager import find_latest, verify_together  # noqa: E402
from common.tensors import local_shard  # noqa: E402
from models.model import HybridLM  # noqa: E402
from optim.adamw import build_optimizer  # noqa: E402
from optim.schedules import build_lr_schedule  # noqa: E402
from pretrain.config import RunConfig, load_config  # noqa: E402
from pretrain.parallelize import parallelize, start  # noqa: E402
from pretrain.runtime import set_up  # noqa: E402
from pretrain.train import checkpoint_layout  # noqa: E402

WORLD = 2
SAVED = "dp_shard=2"
LAYOUTS = {"same": "dp_shard=2", "changed": "tp=2"}
SIZES = {"full": dict(layers=16, d_model=2048, mlp_hidden=5632, vocab=32000, heads=16), "tiny": dict(layers=2, d_model=64, mlp_hidden=512, vocab=512, heads=4)}


class Position:
    """Stand-in for the data loader's resumable position."""

    def state_dict(self) -> dict[str, int]:
        return {"row": 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass


def run_config(size: dict[str, int], layout: str) -> RunConfig:
    dim, degree = layout.split("=")
    dims = {"dp_shard": 1, "tp": 1} | {dim: int(degree)}
    return load_config(None, [
        f"model.pattern={'*' * size['layers']}", f"model.d_model={size['d_model']}", f"model.mlp_hidden={size['mlp_hidden']}",
        f"model.vocab_size={size['vocab']}", f"model.mixers.attention.num_heads={size['heads']}", "model.tie_embeddings=false",
        *(f"parallel.{d}={n}" for d, n in dims.items()), "optim.state_dtype=int8", "optim.compile=false", "checkpoint.mode=sync",
        "train.device=cpu", "train.dtype=float32", "train.threads=1",
    ])


def build(cfg: RunConfig) -> tuple[Any, torch.nn.Module, torch.optim.Optimizer, Any]:
    """This rank's shards of the model (built on meta, then only they allocated), its AdamW and schedule."""
    runtime = set_up(cfg.train)
    par = start(cfg, runtime)
    with torch.device("meta"):
        model = HybridLM(cfg.model)
    parallelize(par, model, cfg, runtime)
    par.module.to_empty(device="cpu")
    with torch.no_grad():
        for i, p in enumerate(par.module.parameters()):
            local_shard(p).fill_(0.01 * (i % 7 + 1))
    optimizer = build_optimizer(par.module, cfg.optim)
    return par, par.module, optimizer, build_lr_schedule(optimizer, 10, **cfg.optim.schedule_options)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The bytes of this rank's optimizer state tensors (local shards)."""
    return sum(local_shard(t).nbytes for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor))


def resident_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def save_rank(root: str, size: dict[str, int]) -> int:
    cfg = run_config(size, SAVED)
    par, module, optimizer, schedule = build(cfg)
    optimizer.init_state()
    saver = build_checkpointer(Path(root), cfg.checkpoint, layout=checkpoint_layout(par, cfg))
    saver.save(1, module, optimizer, schedule, Position(), final=True)
    saver.finalize()
    return state_bytes(optimizer)


def load_rank(root: str, size: dict[str, int], layout: str) -> dict[str, float]:
    cfg = run_config(size, layout)
    _, module, optimizer, schedule = build(cfg)
    path = find_latest(Path(root))
    before = resident_mb()
    began = time.perf_counter()
    verify_together(Ranks.new_group(), path)
    verified = time.perf_counter()
    dcp.load(path, module, optimizer, schedule, Position())
    loaded = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"load_s": loaded - verified, "verify_s": verified - began, "peak_mb": peak, "load_peak_mb": peak - before}


def _worker(rank: int, tmp: str, fn: Any, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        torch.save(fn(*args), os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # past the interpreter's teardown, which can abort after DCP's collectives on gloo


def on_two_processes(fn: Any, *args: Any) -> list[Any]:
    """`fn(*args)` in `WORLD` fresh gloo processes; each one's result."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(tmp, fn, args), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def optimizer_disk_bytes(path: Path) -> int:
    """Bytes DCP stored for the `optimizer.state.*` entries (their extents in the shard files)."""
    metadata = dcp._MetadataOnce(path).read_metadata()
    return sum(info.length for index, info in metadata.storage_data.items() if index.fqn.startswith("optimizer.state."))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a toy model: checks that the bench runs")
    parser.add_argument("--layers", type=int, default=None, help="attention blocks (default 16: ~0.95B parameters)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds of the two loads")
    parser.add_argument("--dir", default=None, help="where the checkpoint goes (default: a temporary directory)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "reshard.json"))
    args = parser.parse_args(argv)
    size = dict(SIZES["tiny" if args.tiny else "full"])
    if args.layers is not None:
        size["layers"] = args.layers
    root = Path(args.dir or tempfile.mkdtemp(prefix="ebb-reshard-"))
    try:
        began = time.perf_counter()
        in_memory = sum(on_two_processes(save_rank, str(root), size))
        saved_in = time.perf_counter() - began
        path = find_latest(root)
        on_disk = optimizer_disk_bytes(path)
        print(f"saved under {SAVED} in {saved_in:.1f}s: {sum(f.stat().st_size for f in path.iterdir()) / 2**30:.2f} GiB")
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in LAYOUTS}
        for r in range(args.rounds):
            for name in (list(LAYOUTS) if r % 2 == 0 else list(LAYOUTS)[::-1]):
                ranks = on_two_processes(load_rank, str(root), size, LAYOUTS[name])
                rounds[name].append({key: max(rank[key] for rank in ranks) for key in ranks[0]})
                print(f"round {r + 1}: {name} ({LAYOUTS[name]}): " + ", ".join(f"{k} {v:.2f}" for k, v in rounds[name][-1].items()), flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    medians = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rounds.items()}
    ratios = {key: medians["changed"][key] / medians["same"][key] for key in medians["same"]}
    params = sum(p.numel() for p in _meta_model(size).parameters())
    print(f"\nresume a checkpoint of {params / 1e6:,.1f}M parameters with int8 states saved under {SAVED}, 2 gloo processes, "
          f"threads 1, median of {args.rounds} alternated rounds")
    print(f"{'':>24} {'same (' + LAYOUTS['same'] + ')':>20} {'changed (' + LAYOUTS['changed'] + ')':>20} {'changed / same':>15}")
    for key in medians["same"]:
        print(f"{key:>24} {medians['same'][key]:>20.2f} {medians['changed'][key]:>20.2f} {ratios[key]:>14.2f}x")
    print(f"optimizer state: {on_disk / 2**20:.1f} MiB on disk, {in_memory / 2**20:.1f} MiB in memory (one replica): {on_disk / in_memory:.3f}x")
    result = {
        "params": params, "saved": SAVED, "layouts": LAYOUTS, "rounds": rounds, "medians": medians, "ratios": ratios,
        "optimizer_bytes": {"disk": on_disk, "memory": in_memory, "ratio": on_disk / in_memory}, "save_s": saved_in, "size": size,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _meta_model(size: dict[str, int]) -> torch.nn.Module:
    with torch.device("meta"):
        return HybridLM(run_config(size, SAVED).model)


if __name__ == "__main__":
    main()
