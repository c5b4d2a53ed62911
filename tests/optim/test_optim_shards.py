"""Optimizer states under layouts that cut blocks (real gloo processes): a row split that is not
whole blocks, FSDP2 sharding 1-D tensors (uneven and empty shards), a last dim split over two
mesh dims (FSDP2 over TP), beside shards of whole blocks. For every codec in `CODECS`, with and
without master weights: the parameters and every state part, gathered to their global form,
equal one process's bit for bit after three steps on the same gradients; the blocks' statistics
are exchanged with one all-reduce per process group per step; and each `BlockGrid` says whether
the layout cuts blocks. Eager, for every codec; compiled, for int8."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from optim.adamw import AdamW
from optim.codecs import CODECS
from optim.shards import block_grid
from tests.distributed import run_distributed

WORLD, STEPS = 4, 3
# (global shape, placements on the (2, 2) mesh): what each exercises
LAYOUTS = [
    ((6, 700), [Replicate(), Shard(1)]),  # a row split of 350: cuts 256- and 128-blocks
    ((5, 384), [Shard(0), Shard(1)]),  # rows over one dim (uneven: 3 + 2), columns of 192 over the other
    ((8, 512), [Shard(0), Shard(1)]),  # columns of 256: whole blocks for both codecs
    ((300,), [Replicate(), Shard(0)]),  # FSDP2 on a 1-D tensor
    ((3,), [Shard(0), Replicate()]),  # uneven: 2 + 1, both in one block
    ((1,), [Replicate(), Shard(0)]),  # an empty shard
    ((1000,), [Shard(0), Shard(0)]),  # the last dim over both mesh dims: 4 shards of 250
    ((600,), [_StridedShard(0, split_factor=2), Shard(0)]),  # FSDP2 over TP's split of a 1-D tensor
    ((64, 512), [Shard(0), Replicate()]),  # FSDP2's usual: rows
    ((), [Replicate(), Replicate()]),
]
COMPILED_LAYOUTS = [((6, 700), [Shard(1)]), ((300,), [Shard(0)]), ((3,), [Shard(0)]), ((64, 512), [Shard(0)])]  # on 2 ranks
VARIANTS = [(name, False) for name in CODECS] + [(name, True) for name in CODECS]  # (codec, master weights on bf16 parameters)


def make(dtype: torch.dtype, layouts: list, mesh=None) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(shape, generator=gen).to(dtype) for shape, _ in layouts]
    if mesh is None:
        return [nn.Parameter(t) for t in full]
    return [nn.Parameter(distribute_tensor(t, mesh, placements)) for t, (_, placements) in zip(full, layouts)]


def train(name: str, master: bool, layouts: list = LAYOUTS, mesh=None, compile: bool = False) -> dict[str, torch.Tensor]:
    """Three steps (parameter 3 has no gradient in step 1); every parameter and state tensor in its
    global form, by '<index>.<key>'."""
    dtype = torch.bfloat16 if master else torch.float32
    ps = make(dtype, layouts, mesh)
    optimizer = AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_dtype=name, master_weights=master, compile=compile)
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(10 + step)
        for i, (p, (shape, placements)) in enumerate(zip(ps, layouts)):
            grad = (torch.randn(shape, generator=gen) * 1e-2).to(dtype)
            p.grad = None if (i == 3 and step == 1) else (grad if mesh is None else distribute_tensor(grad, mesh, placements))
        optimizer.step()
    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
    out = {f"{i}.param": full(p.detach()) for i, p in enumerate(ps)}
    out |= {f"{i}.{key}": full(value) for i, p in enumerate(ps) for key, value in optimizer.state[p].items()}
    return out


def sharded(variants: list[tuple[str, bool]], layouts: list = LAYOUTS, compile: bool = False) -> dict:
    mesh = init_device_mesh("cpu", (2, 2) if layouts is LAYOUTS else (2,), mesh_dim_names=("a", "b") if layouts is LAYOUTS else ("a",))
    grids = {}
    for name in ("int8", "fp8"):
        ps = make(torch.float32, layouts, mesh)
        grids[name] = [block_grid(p, CODECS[name].block).shared for p in ps]
    reduces = []
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda tensor, op, group=None: (reduces.append(tuple(dist.get_process_group_ranks(group))), all_reduce(tensor, op, group=group))[1]
    try:
        states = {variant: train(*variant, layouts, mesh, compile) for variant in variants}
    finally:
        dist.all_reduce = all_reduce
    return {"grids": grids, "states": states, "reduces": reduces}


@pytest.mark.distributed
@pytest.mark.slow
def test_layouts_that_cut_blocks_store_what_one_process_stores():
    ranks = run_distributed(sharded, WORLD, VARIANTS)
    # cut: rows of 350, of 192 (int8; fp8 cuts its 128-groups too), the 1-D splits of 300, 3, 1000 and 600
    assert ranks[0]["grids"] == {
        "int8": [True, True, False, True, True, False, True, True, False, False],
        "fp8": [True, True, False, True, True, False, True, True, False, False],
    }
    for variant in VARIANTS:
        want = train(*variant)
        for rank in ranks:
            got = rank["states"][variant]
            assert got.keys() == want.keys(), variant
            for key in want:
                assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (variant, key)
    block_codecs = sum(CODECS[name].block is not None for name, _ in VARIANTS)
    for rank, result in enumerate(ranks):
        # per step: one all-reduce over each group that splits a last dim (mesh dim a's and b's), for each block codec
        groups = {tuple(sorted(g)) for g in result["reduces"]}
        assert len(groups) == 2 and all(rank in g for g in groups)
        assert len(result["reduces"]) == 2 * STEPS * block_codecs


@pytest.mark.distributed
@pytest.mark.slow
def test_a_compiled_step_on_layouts_that_cut_blocks_stores_what_one_process_stores():
    """Compiled (the statistics pass and the step that encodes with exchanged statistics are
    graphs of their own): the same bits as one process's compiled step; int8, on 2 ranks."""
    variant = ("int8", False)
    for rank in run_distributed(sharded, 2, [variant], COMPILED_LAYOUTS, True):
        assert rank["grids"]["int8"] == [True, True, True, False]
        want = train(*variant, COMPILED_LAYOUTS, compile=True)
        got = rank["states"][variant]
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
