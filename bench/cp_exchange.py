"""Context parallelism's exchanges between pieces, at cp 2 and cp 4 (CPU, gloo, one process per
rank), in one run:

- state passing, forward and backward: the pipelined chain ebb uses (rank p waits for the state
  entering it from rank p - 1, applies its piece's summary and sends the result on;
  `Piece.relay`) against one all-gather of every piece's summary [H_p | M_p] followed by each
  rank's prefix: seconds (the slowest rank, median of the rounds), as chain / all-gather, and
  the bytes each rank sends;
- causal imbalance of attention: each rank's forward + backward seconds of SDPA for its piece's
  queries against every key up to the end of its piece (timed one after the other in one
  process, so that no rank's wait hides in another's time), as the slowest rank over the mean,
  next to the count of query-key pairs (slowest / mean -> 2 cp / (cp + 1) for contiguous
  pieces).

    python bench/cp_exchange.py           # Gated DeltaNet 1.3B's state: 6 heads, d_k 256, d_v 512
    python bench/cp_exchange.py --tiny --cp 2    # seconds: checks that the bench runs

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
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.context import Piece  # noqa: E402
from parallel.context_parallel import GroupComm  # noqa: E402

SIZES = {
    "full": dict(heads=6, key=256, value=512, rows=1, rounds=7, d_model=512, attn_heads=8, piece=1024),
    "tiny": dict(heads=2, key=8, value=8, rows=1, rounds=2, d_model=32, attn_heads=2, piece=32),
}


def combine(state: torch.Tensor | None, summary: torch.Tensor) -> torch.Tensor:
    """S_out = M_p S_in + H_p from a summary [H_p | M_p] (the matrix transition)."""
    written, moved = summary.split([summary.shape[-1] - summary.shape[-2], summary.shape[-2]], dim=-1)
    return written if state is None else moved @ state + written


def relayed(piece: Piece, summary: torch.Tensor) -> torch.Tensor:
    """ebb's: the state passes along the ranks (models.context.Piece.relay)."""
    incoming, sent = piece.relay(summary, combine)
    return incoming.sum() + 0 * sent


def all_gathered(piece: Piece, summary: torch.Tensor) -> torch.Tensor:
    """The alternative: one all-gather of every rank's summary, then each rank's prefix."""
    gathered = piece.all_gather(summary)
    state = combine(None, gathered[0]) * (piece.comm.rank > 0)
    for p in range(1, piece.comm.rank):
        state = combine(state, gathered[p])
    return state.sum()


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def time_exchange(comm: GroupComm, exchange, size: dict) -> tuple[float, int]:
    """Seconds (slowest rank, median) of one forward and backward exchange, and this rank's bytes sent."""
    g = torch.Generator().manual_seed(comm.rank)
    summary = torch.cat([
        torch.randn(size["rows"], size["heads"], size["key"], size["value"], generator=g),
        torch.randn(size["rows"], size["heads"], size["key"], size["key"], generator=g) / size["key"],
    ], dim=-1).requires_grad_(True)
    times, before = [], comm.sent_bytes
    for _ in range(size["rounds"]):
        dist.barrier()
        start = time.perf_counter()
        exchange(Piece(comm, size["rows"], 1, None), summary).backward()
        times.append(slowest(time.perf_counter() - start))
    return statistics.median(times), (comm.sent_bytes - before) // size["rounds"]


def attention_seconds(world: int, size: dict) -> list[float]:
    """Each rank's forward + backward seconds of SDPA for its queries against the keys up to the
    end of its piece (lower-right causal), run one after the other in this process."""
    T, heads, dim = size["piece"], size["attn_heads"], size["d_model"] // size["attn_heads"]
    seconds = []
    for p in range(world):
        q = torch.randn(1, heads, T, dim, requires_grad=True)
        k, v = (torch.randn(1, heads, (p + 1) * T, dim, requires_grad=True) for _ in range(2))
        times = []
        for _ in range(size["rounds"]):
            start = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, (p + 1) * T)).sum().backward()
            times.append(time.perf_counter() - start)
        seconds.append(statistics.median(times))
    return seconds


def worker(rank: int, world: int, tmp: str, size: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    comm = GroupComm(dist.group.WORLD)
    result = {}
    for name, exchange in (("all_gather", all_gathered), ("chain", relayed)):
        exchange(Piece(comm, 1, 1, None), torch.zeros(1, 1, 1, 2, requires_grad=True)).backward()  # warm the connections
        result[name], result[f"{name}_bytes"] = time_exchange(comm, exchange, size)
    torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run(world: int, size: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, tmp, size), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4], help="context-parallel sizes")
    parser.add_argument("--out", default=str(REPO / "bench/results/cp_exchange.json"))
    args = parser.parse_args()
    size = SIZES["tiny" if args.tiny else "full"]
    rows = []
    for world in args.cp:
        ranks = run(world, size)
        attention = attention_seconds(world, size)
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
    header = ["cp", "all-gather s", "chain s", "chain/AG", "AG MB/rank", "chain MB/rank", "attn slowest/mean", "pairs slowest/mean"]
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (3, 13, 10, 9, 11, 14, 18, 19))))
    for r in rows:
        print(f"{r['cp']:>3} {r['all_gather_s']:>13.5f} {r['chain_s']:>10.5f} {r['chain_over_all_gather']:>9.2f} "
              f"{r['all_gather_bytes_per_rank'] / 1e6:>11.2f} {r['chain_bytes_per_rank'] / 1e6:>14.2f} "
              f"{r['attention_slowest_over_mean']:>18.2f} {r['attention_pairs_slowest_over_mean']:>19.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"size": size, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
