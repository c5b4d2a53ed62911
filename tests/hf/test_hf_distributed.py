"""A checkpoint saved by 4 real processes under tp 2 x pp 2 (DTensor shards of every mixer in
four DCP files, int8 optimizer states, the lazy checkpointer) exports exactly the tensors that the
same model saved in one process (fp32 states, sync) does."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from checkpoint import build_checkpointer
from models.model import HybridLM
from optim.adamw import build_optimizer
from pretrain.config import RunConfig, dump_config, load_config
from pretrain.parallelize import parallelize, start
from pretrain.runtime import set_up
from tests.distributed import run_distributed
from tests.hf.helpers import to_hf

pytestmark = pytest.mark.distributed

TINY = [
    "model.pattern=RM*OP | RTGS", "model.d_model=32", "model.mlp_hidden=64", "model.tie_embeddings=false",
    "model.mixers.attention.num_heads=4", "model.mixers.attention.num_kv_heads=2",
    "model.mixers.mamba2.head_dim=8", "model.mixers.mamba2.d_state=8", "model.mixers.mamba2.n_groups=2",
    "model.mixers.mamba2.chunk_size=8", "model.mixers.deltanet.num_heads=2",
    "model.mixers.gated_deltanet.num_heads=2", "model.mixers.gated_deltanet.head_dim=8",
    "model.mixers.rwkv7.head_dim=8", "model.mixers.mom.num_heads=2", "model.mixers.mom.head_dim=8",
    "model.mixers.sse.num_heads=2", "model.mixers.sse.head_dim=8",
    "model.mixers.gated_deltaproduct.num_heads=2", "model.mixers.gated_deltaproduct.head_dim=8",
    "train.threads=1", "train.device=cpu", "train.dtype=float32", "train.batch_size=2", "optim.fused=false",
]
TP2_PP2 = ["parallel.tp=2", "parallel.pp=2", "parallel.dp_shard=1", "optim.state_dtype=int8", "optim.min_quant_numel=64", "checkpoint.mode=lazy"]


class _Stub:
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def save_as_built(cfg: RunConfig, root: str) -> None:
    """Build the model as pretrain.train does on this rank (the same seed everywhere: the same full
    model before sharding) and save it with its optimizer (states as DCP initialises them)."""
    runtime = set_up(cfg.train)
    par = start(cfg, runtime)
    parallelize(par, HybridLM(cfg.model), cfg, runtime)
    optimizer = build_optimizer(par.module, cfg.optim)
    checkpoints = build_checkpointer(Path(root), cfg.checkpoint, {"config.yaml": dump_config(cfg)}, {"world_size": par.world_size, **par.shape})
    checkpoints.save(1, par.module, optimizer, _Stub(), _Stub(), final=True)
    checkpoints.finalize()


def exported(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_tp2_pp2_checkpoint_exports_as_one_process(tmp_path: Path) -> None:
    run_distributed(save_as_built, 4, load_config(None, [*TINY, *TP2_PP2]), str(tmp_path / "tp2pp2"))
    save_as_built(load_config(None, [*TINY, "checkpoint.mode=sync"]), str(tmp_path / "one"))
    manifest = (tmp_path / "tp2pp2" / "step-00000001" / "manifest.json").read_text()
    assert all(f"__{rank}_0.distcp" in manifest for rank in range(4))
    to_hf(tmp_path / "tp2pp2", tmp_path / "hf_tp2pp2")
    to_hf(tmp_path / "one", tmp_path / "hf_one")
    theirs, ours = exported(tmp_path / "hf_tp2pp2"), exported(tmp_path / "hf_one")
    assert theirs.keys() == ours.keys() and len(ours) > 100
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name
