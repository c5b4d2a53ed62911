"""Peak memory of one loss forward + backward: today's full logits against the chunked linear
cross-entropy (pretrain/linear_ce.py), same inputs, as a ratio.

    python bench/loss_memory.py [--vocab 131072] [--tokens 16384] [--hidden 1024] [--real-tokens 1024]
    python bench/loss_memory.py --tp 2 [--vocab 65536] [--tokens 8192] [--hidden 256]
    python bench/loss_memory.py --pp-stage --tokens 4096 --hidden 512 [--vocab 131072]

The peak counts every tensor alive at once (inputs, weights, logits, saved activations,
gradients), tracked at each op by a dispatch mode over tensor storages. On `meta` tensors this is
exact at any size without allocating; the same tracker on real CPU tensors at `--real-tokens`
checks that the meta count is the real one. Inputs are float32 (CPU); the head's weight gets a
gradient. With `--tp N`, N gloo processes on real CPU tensors, the head sharded over the
vocabulary: loss-parallel cross-entropy over the sharded full logits against the
vocabulary-parallel chunked loss, each rank's peak. With `--pp-stage`, the last pipeline stage
(`parallel.pipeline.StageModule`: a Gated DeltaNet block, the final norm and the head) on one
microbatch of real CPU tensors, forward and backward: returning its logits to the schedule's
loss, against applying the chunked loss inside its forward. Writes
bench/results/loss_memory[_tp|_pp].json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pretrain.linear_ce import chunked_linear_cross_entropy  # noqa: E402
from pretrain.loss import lm_loss  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by live tensor storages, counted from when it was entered
    (pre-existing tensors count through `hold`)."""

    def __init__(self):
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.peak = 0

    def hold(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            self.live[StorageWeakRef(t.untyped_storage())] = t.untyped_storage().nbytes()
        self._update()

    def _update(self) -> None:
        self.live = {ref: n for ref, n in self.live.items() if not ref.expired()}
        self.peak = max(self.peak, sum(self.live.values()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                self.live.setdefault(ref, t.untyped_storage().nbytes())
        self._update()
        return out


def peak(kind: str, tokens: int, vocab: int, hidden: int, device: str) -> int:
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device)
    with LiveBytes() as mode:
        mode.hold(h, w, labels)
        if kind == "full":
            loss = lm_loss((h @ w.t())[None], labels[None], reduction="sum")
        else:
            loss = chunked_linear_cross_entropy(h, w, labels)
        loss.backward()
        mode.hold(h.grad, w.grad)
        del loss
    return mode.peak


def tp_rank(rank: int, tp: int, tokens: int, vocab: int, hidden: int, tmp: str) -> None:
    """One of `tp` ranks (torch.multiprocessing.spawn): both losses' peaks on its local tensors."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=tp)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (tp,))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    w = distribute_tensor(torch.randn(vocab, hidden, generator=g) * 0.02, mesh, [Shard(0)]).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    result = {}
    for kind in ("full", "chunked"):
        h.grad = w.grad = None
        with LiveBytes() as mode:
            mode.hold(h, w.to_local(), labels)
            if kind == "full":
                with loss_parallel():
                    loss = lm_loss((DTensor.from_local(h, mesh, [Replicate()]) @ w.t())[None], labels[None], reduction="sum")
                    loss.backward()
                loss = loss.full_tensor()
            else:
                loss = chunked_linear_cross_entropy(h, w, labels)
                loss.backward()
            mode.hold(h.grad, w.grad.to_local())
        result[kind] = {"peak_bytes": mode.peak, "loss": float(loss.detach())}
    if rank == 0:
        Path(tmp, "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    os._exit(0)  # past gloo's teardown, which now and then aborts the interpreter's exit (tests/distributed.py)


def main_tp(args: argparse.Namespace) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(tp_rank, args=(args.tp, args.tokens, args.vocab, args.hidden, tmp), nprocs=args.tp, join=True)
        result = json.loads(Path(tmp, "result.json").read_text())
    peaks = {kind: (result[kind]["peak_bytes"], result[kind]["loss"]) for kind in ("full", "chunked")}
    what = f"tp {args.tp}, {args.tokens} tokens, vocab {args.vocab}, hidden {args.hidden}, per rank: loss-parallel full logits"
    return report(args, "tp", {"tp": args.tp}, peaks, what, "vocabulary-parallel chunked")


def report(args: argparse.Namespace, mode: str, extra: dict, peaks: dict[str, tuple[int, float]], full_words: str, chunked_words: str) -> dict:
    """Print one mode's comparison (peaks and losses, full then chunked) and write its JSON row."""
    (full, loss_full), (chunked, loss_chunked) = peaks["full"], peaks["chunked"]
    row = {**extra, "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "full_peak_bytes": full,
           "chunked_peak_bytes": chunked, "ratio": chunked / full, "loss_full": loss_full, "loss_chunked": loss_chunked}
    print(f"{full_words} {full / 2**30:.3f} GiB, {chunked_words} {chunked / 2**30:.3f} GiB ({chunked / full:.3f}x); "
          f"losses {loss_full:.6g} and {loss_chunked:.6g}")
    out = Path(args.out).with_name(f"loss_memory_{mode}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1) + "\n")
    return row


def pp_stage_peak(loss: str, tokens: int, vocab: int, hidden: int) -> tuple[int, float]:
    """The last of two stages, forward and backward on one microbatch: its peak and its loss."""
    from models.model import HybridLM
    from parallel.pipeline import build_stage_modules
    from pretrain.config import build_config
    from pretrain.linear_ce import head_loss

    mixers = {"gated_deltanet": {"num_heads": 4, "head_dim": hidden // 4}}
    cfg = build_config({"model": {"pattern": "G | G", "d_model": hidden, "vocab_size": vocab, "mixers": mixers}}).model
    torch.manual_seed(0)
    (stage,), _ = build_stage_modules(HybridLM(cfg), 1, 2, 1, tokens)
    stage.head_loss = head_loss(loss)
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    doc_starts = torch.zeros(1, tokens, dtype=torch.bool)
    doc_starts[0, 0] = True
    with LiveBytes() as mode:
        mode.hold(x, labels, *stage.parameters())
        out = stage(x, doc_starts=doc_starts, labels=labels)
        total = lm_loss(out, labels, reduction="sum") if stage.head_loss is None else out
        total.backward()
        mode.hold(x.grad, *(p.grad for p in stage.parameters()))
        del out
    return mode.peak, float(total.detach())


def main_pp_stage(args: argparse.Namespace) -> dict:
    peaks = {loss: pp_stage_peak(loss, args.tokens, args.vocab, args.hidden) for loss in ("full", "chunked")}
    what = (f"last pipeline stage (a G block, norm, head), one microbatch of {args.tokens} tokens, vocab {args.vocab}, "
            f"hidden {args.hidden}: logits to the schedule")
    return report(args, "pp", {}, peaks, what, "chunked loss inside the stage")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--real-tokens", type=int, default=1024, help="tokens of the check on real CPU tensors (0: skip)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (gloo, real CPU tensors): the vocabulary-parallel loss")
    parser.add_argument("--pp-stage", action="store_true", help="the last pipeline stage, logits out against the loss inside it")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "loss_memory.json"))
    args = parser.parse_args(argv)
    if args.tp > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        return main_tp(args)
    if args.pp_stage:
        return main_pp_stage(args)
    rows = []
    sizes = [("meta", args.tokens)] + ([("meta", args.real_tokens), ("cpu", args.real_tokens)] if args.real_tokens else [])
    print(f"{'device':>6} {'tokens':>7} {'vocab':>7} {'hidden':>6} {'full GiB':>9} {'chunked GiB':>12} {'ratio':>7}")
    for device, tokens in sizes:
        full, chunked = (peak(kind, tokens, args.vocab, args.hidden, device) for kind in ("full", "chunked"))
        row = {"device": device, "tokens": tokens, "vocab": args.vocab, "hidden": args.hidden,
               "full_peak_bytes": full, "chunked_peak_bytes": chunked, "ratio": chunked / full}
        rows.append(row)
        print(f"{device:>6} {tokens:>7} {args.vocab:>7} {args.hidden:>6} {full / 2**30:>9.2f} {chunked / 2**30:>12.2f} {chunked / full:>7.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return {"rows": rows}


if __name__ == "__main__":
    main()
