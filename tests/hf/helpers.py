"""Small models, checkpoints saved through ebb's checkpointer, and the conversion CLI in-process."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from checkpoint import build_checkpointer
from checkpoint.config import CheckpointConfig
from checkpoint.convert import main as convert
from models.config import ModelConfig
from models.model import HybridLM
from tests.mixer_checks import SMALL_MIXERS

D_MODEL = 32
HYBRID = "MTG* ROSP"  # every mixer
# the models fla's format holds: pattern, mixer options, tied embeddings, fla's class and model_type
GDN, DELTANET = {"norm_eps": 1e-6}, {"norm_eps": 1e-6}
FLA_CASES = [
    ("GGG", {"gated_deltanet": GDN}, False, "GatedDeltaNetForCausalLM", "gated_deltanet"),
    ("GGG", {"gated_deltanet": GDN | {"num_v_heads": 4, "allow_neg_eigval": True, "conv_size": 3}}, True, "GatedDeltaNetForCausalLM", "gated_deltanet"),
    ("TTT", {"deltanet": DELTANET}, False, "DeltaNetForCausalLM", "delta_net"),
    ("TTT", {"deltanet": DELTANET | {"head_dim": 8, "expand_v": 1.5, "use_gate": True, "use_beta": False, "allow_neg_eigval": True}}, True,
     "DeltaNetForCausalLM", "delta_net"),
    ("G*G*", {"gated_deltanet": GDN, "attention": {"rope_theta": 500.0}}, False, "GatedDeltaNetForCausalLM", "gated_deltanet"),
    ("*TT", {"deltanet": DELTANET, "attention": {"num_heads": 2, "num_kv_heads": 2, "window_size": 5, "qkv_bias": True}}, True,
     "DeltaNetForCausalLM", "delta_net"),
    ("PPP", {"gated_deltaproduct": GDN | {"num_householder": 2}}, False, "GatedDeltaProductForCausalLM", "gated_deltaproduct"),
    ("P*P", {"gated_deltaproduct": GDN | {"num_householder": 3, "allow_neg_eigval": False, "conv_size": 3}, "attention": {}}, True,
     "GatedDeltaProductForCausalLM", "gated_deltaproduct"),
]
FLA_IDS = [
    "gdn", "gdn-gva-neg-eigval-conv3-tied", "deltanet", "deltanet-heads-gate-no-beta-tied", "gdn-attention-gqa",
    "attention-window-bias-deltanet-tied", "deltaproduct", "deltaproduct-3-attention-tied",
]


def small_config(pattern: str, mixers: dict | None = None, **model) -> ModelConfig:
    sections = {name: dict(section) for name, section in SMALL_MIXERS.items()}
    for name, options in (mixers or {}).items():
        sections[name].update(options)
    return ModelConfig(pattern=pattern, d_model=D_MODEL, mlp_hidden=64, mixers=sections, **model)


def small_model(cfg: ModelConfig, seed: int = 0) -> HybridLM:
    """Norm weights and biases start at 1 and 0: perturbed here, so that a misplaced one shows."""
    torch.manual_seed(seed)
    model = HybridLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias", "norm_f.weight")):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


class _Stub:
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def save_checkpoint(root: Path, model: HybridLM, step: int = 3, mode: str = "sync", tokenizer: str = "byte") -> Path:
    """`model` saved at `step` through ebb's checkpointer (with AdamW's state, as training saves it)."""
    text = yaml.safe_dump({"model": model.cfg.model_dump(mode="json"), "data": {"tokenizer": tokenizer}}, sort_keys=False)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoints = build_checkpointer(root, CheckpointConfig(mode=mode), {"config.yaml": text})
    checkpoints.save(step, model, optimizer, _Stub(), _Stub(), final=True)
    return checkpoints.finalize()


def exported_native(tmp_path: Path, cfg: ModelConfig) -> HybridLM:
    """A small model of `cfg`, saved through ebb's checkpointer and exported to `tmp_path / "hf"`
    with `--format native --dtype fp32`."""
    model = small_model(cfg)
    to_hf(save_checkpoint(tmp_path / "run" / "checkpoints", model), tmp_path / "hf", "--format", "native", "--dtype", "fp32")
    return model


def to_hf(checkpoint: Path, output: Path, *args: str) -> None:
    assert convert(["to-hf", "--checkpoint", str(checkpoint), "--output", str(output), *args]) == 0


def from_hf(folder: Path, output: Path, *args: str) -> None:
    assert convert(["from-hf", "--model", str(folder), "--output", str(output), *args]) == 0


def reloaded(run_dir: Path) -> HybridLM:
    """The ebb model of a run dir that from-hf wrote, with its step-0 weights."""
    from checkpoint import load_model, resolve_checkpoint
    from pretrain.config import load_config

    model = HybridLM(load_config(run_dir / "config.yaml").model)
    load_model(resolve_checkpoint(run_dir), model)
    return model.eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def token_ids(vocab: int = 257, shape: tuple[int, int] = (2, 13), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
