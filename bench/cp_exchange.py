"""Context parallelism's exchanges between pieces, at cp 2 and cp 4 (CPU, gloo, one process per
rank), in one run:

- state passing: the all-gather of every piece's summary [H_p | M_p] followed by each rank's
  prefix (what ebb does) against a pipelined chain (rank p waits for the state entering it from
  rank p - 1, applies its piece and sends the result on): seconds per exchange (the slowest
  rank, median of the rounds), as chain / all-gather, and the bytes each rank sends;
- causal imbalance of attention: each rank's forward + backward seconds of a context-parallel
  attention layer (queries of its piece against every earlier key), as the slowest rank over the
  mean, next to the count of query-key pairs (slowest / mean = 2 cp / (cp + 1) for contiguous
  pieces).

    python bench/cp_exchange.py           # Gated DeltaNet 1.3B's state: 6 heads, d_k 256, d_v 512
    python bench/cp_exchange.py --tiny    # seconds: checks that the bench runs

Results: bench/results/cp_exchange.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.config import ModelConfig  # noqa: E402
from models.context import Piece, context_parallel  # noqa: E402
from models.mixers.attention import Attention  # noqa: E402
from parallel.context_parallel import GroupComm  # noqa: E402

SIZES = {
    "full": dict(heads=6, key=256, value=512, rows=1, rounds=7, d_model=512, attn_heads=8, piece=1024),
    "tiny": dict(heads=2, key=8, value=8, rows=1, rounds=2, d_model=32, attn_heads=2, piece=32),
}


def all_gather_exchange(comm: GroupComm, written: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """ebb's: one all-gather of [H_p | M_p], then S_in = prefix over the earlier pieces."""
    gathered = comm.all_gather(torch.cat([written, moved], dim=-1))
    state = torch.zeros_like(written)
    for p in range(comm.rank):
        h, m = gathered[p].split([written.shape[-1], moved.shape[-1]], dim=-1)
        state = m @ state + h
    return state


def chained_exchange(comm: GroupComm, written: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """The alternative: S_in arrives from rank - 1, S_out = M_p S_in + H_p goes to rank + 1."""
    state = torch.zeros_like(written)
    if comm.rank > 0:
        dist.recv(state, dist.get_global_rank(comm.group, comm.rank - 1), group=comm.group)
    if comm.rank < comm.size - 1:
        dist.send(moved @ state + written, dist.get_global_rank(comm.group, comm.rank + 1), group=comm.group)
    return state


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def time_exchange(comm: GroupComm, exchange, size: dict) -> tuple[float, int]:
    g = torch.Generator().manual_seed(comm.rank)
    shape = (size["rows"], size["heads"], size["key"])
    written = torch.randn(*shape, size["value"], generator=g)
    moved = torch.randn(*shape, size["key"], generator=g) / size["key"]
    times, before = [], comm.sent_bytes
    for _ in range(size["rounds"]):
        dist.barrier()
        start = time.perf_counter()
        exchange(comm, written, moved)
        times.append(slowest(time.perf_counter() - start))
    sent = (comm.sent_bytes - before) // size["rounds"] if exchange is all_gather_exchange else written.numel() * written.element_size() * (comm.rank < comm.size - 1)
    return statistics.median(times), sent


def attention_seconds(comm: GroupComm, size: dict) -> float:
    """This rank's forward + backward seconds of one context-parallel attention layer."""
    cfg = ModelConfig(pattern="*", d_model=size["d_model"], mixers={"attention": {"num_heads": size["attn_heads"]}})
    torch.manual_seed(0)
    layer = Attention(cfg, 0)
    x = torch.randn(1, size["piece"], size["d_model"], requires_grad=True)
    times = []
    for _ in range(size["rounds"]):
        dist.barrier()
        start = time.perf_counter()
        with context_parallel(Piece(comm, 1, size["piece"], None)):
            layer(x).square().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank: int, world: int, tmp: str, size: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    comm = GroupComm(dist.group.WORLD)
    result = {}
    for name, exchange in (("all_gather", all_gather_exchange), ("chain", chained_exchange)):
        exchange(comm, torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))  # warm the connections
        result[name], result[f"{name}_bytes"] = time_exchange(comm, exchange, size)
    result["attention_s"] = attention_seconds(comm, size)
    torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run(world: int, size: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, tmp, size), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench/results/cp_exchange.json"))
    args = parser.parse_args()
    size = SIZES["tiny" if args.tiny else "full"]
    rows = []
    for world in (2, 4):
        ranks = run(world, size)
        attention = [r["attention_s"] for r in ranks]
        pairs = [(p + 1) * size["piece"] ** 2 - size["piece"] * (size["piece"] - 1) / 2 for p in range(world)]
        rows.append({
            "cp": world,
            "all_gather_s": ranks[0]["all_gather"], "chain_s": ranks[0]["chain"],
            "chain_over_all_gather": ranks[0]["chain"] / ranks[0]["all_gather"],
            "all_gather_bytes_per_rank": max(r["all_gather_bytes"] for r in ranks),
            "chain_bytes_per_rank": max(r["chain_bytes"] for r in ranks),
            "attention_s_per_rank": attention,
            "attention_slowest_over_mean": max(attention) / statistics.mean(attention),
            "attention_pairs_slowest_over_mean": max(pairs) / statistics.mean(pairs),
        })
    print(f"state summary: {size['rows']} row x {size['heads']} heads x d_k {size['key']} x d_v {size['value']} (fp32); "
          f"attention: d_model {size['d_model']}, piece {size['piece']} tokens")
    print(f"{'cp':>3} {'all-gather s':>13} {'chain s':>10} {'chain/AG':>9} {'AG MB/rank':>11} {'chain MB/rank':>14} {'attn slowest/mean':>18} {'pairs slowest/mean':>19}")
    for r in rows:
        print(f"{r['cp']:>3} {r['all_gather_s']:>13.5f} {r['chain_s']:>10.5f} {r['chain_over_all_gather']:>9.2f} "
              f"{r['all_gather_bytes_per_rank'] / 1e6:>11.2f} {r['chain_bytes_per_rank'] / 1e6:>14.2f} "
              f"{r['attention_slowest_over_mean']:>18.2f} {r['attention_pairs_slowest_over_mean']:>19.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"size": size, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
