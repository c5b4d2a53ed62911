"""`to-hf --format native`: a Mamba2-only model loads in transformers' Mamba2ForCausalLM, an
attention-only one in LlamaForCausalLM (Qwen2ForCausalLM with qkv bias, MistralForCausalLM with
a window), with no remote code and ebb's logits (float32, 1e-5; norms, MLP, RoPE and tying
included); `from-hf` brings them back, and imports a Mamba2 made by transformers itself."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.hf.helpers import FLA_CASES, FLA_IDS, exported_native, from_hf, logits, reloaded, save_checkpoint, small_config, small_model, token_ids

torch.set_num_threads(1)
TOL = 1e-5


def load_native(folder: Path) -> torch.nn.Module:
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and not list(folder.glob("*.py"))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def round_trip(tmp_path: Path, cfg, architecture: str) -> None:
    model = exported_native(tmp_path, cfg)
    ids = token_ids(shape=(2, 17))
    expected = logits(model, ids)
    exported = load_native(tmp_path / "hf")
    assert type(exported).__name__ == architecture
    torch.testing.assert_close(logits(exported, ids), expected, rtol=0, atol=TOL)
    from_hf(tmp_path / "hf", tmp_path / "back")
    torch.testing.assert_close(logits(reloaded(tmp_path / "back"), ids), expected, rtol=0, atol=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("n_groups", [1, 2])
def test_mamba2_only_is_mamba2forcausallm(tmp_path: Path, n_groups: int) -> None:
    cfg = small_config("MMM", mixers={"mamba2": {"n_groups": n_groups}}, mlp="none")
    round_trip(tmp_path, cfg, "Mamba2ForCausalLM")


@pytest.mark.parametrize(
    "options, tie, architecture",
    [
        ({}, False, "LlamaForCausalLM"),
        ({"qkv_bias": True, "rope_theta": 500.0}, True, "Qwen2ForCausalLM"),
        ({"window_size": 5}, False, "MistralForCausalLM"),
        ({"window_size": 5, "qkv_bias": True}, False, "Qwen2ForCausalLM"),
    ],
    ids=["llama", "qwen2-qkv-bias-tied", "mistral-window", "qwen2-window"],
)
def test_attention_only_is_the_matching_transformers_class(tmp_path: Path, options: dict, tie: bool, architecture: str) -> None:
    cfg = small_config("***", mixers={"attention": options}, tie_embeddings=tie, norm_eps=1e-6)
    round_trip(tmp_path, cfg, architecture)


@pytest.mark.parametrize("pattern, mixers, tie, architecture, model_type", FLA_CASES, ids=FLA_IDS)
def test_delta_rule_models_are_flas_and_come_back(tmp_path: Path, pattern: str, mixers: dict, tie: bool, architecture: str, model_type: str) -> None:
    """fla's format is written and read without fla: fla's model_type and keys in config.json (the
    attention blocks as fla's `attn` layers), fla's names on the weights; from-hf brings ebb's
    config and logits back (tests/hf/test_hf_fla.py loads the folder in fla itself, under Triton's
    interpreter)."""
    from safetensors import safe_open

    cfg = small_config(pattern, mixers=mixers, norm_eps=1e-6, tie_embeddings=tie)
    model = exported_native(tmp_path, cfg)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == model_type and config["architectures"] == [architecture]
    assert "auto_map" not in config and not list((tmp_path / "hf").glob("*.py"))
    assert (config["intermediate_size"], config["norm_eps"], config["tie_word_embeddings"], config["num_hidden_layers"]) == (64, 1e-6, tie, len(pattern))
    assert (config["attn"] or {}).get("layers", []) == [i for i, kind in enumerate(pattern) if kind == "*"]
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert len(names) == len(model.state_dict()) - tie and {"model.embeddings.weight", f"model.layers.{len(pattern) - 1}.attn.o_proj.weight"} <= names
    assert ("lm_head.weight" in names) != tie
    from_hf(tmp_path / "hf", tmp_path / "back")
    back = reloaded(tmp_path / "back")
    assert back.cfg.pattern == pattern
    same = {"exclude": {"chunk_size", "head_dim"}}  # fla's chunk size; a head_dim of None comes back as the width it stood for
    for section in mixers:
        assert getattr(back.cfg.mixers, section).model_dump(**same) == getattr(cfg.mixers, section).model_dump(**same), section
    ids = token_ids(shape=(2, 17))
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=0, atol=TOL)  # fla's chunk size, 64


def test_what_flas_format_cannot_hold_is_one_line(tmp_path: Path, capsys) -> None:
    from checkpoint.convert import main as convert

    for pattern, mixers, error in (
        ("GG", {"gated_deltanet": {"norm_eps": 1e-5}}, "norm_eps differs from model.norm_eps"),
        ("G*", {"gated_deltanet": {"norm_eps": 1e-6}, "attention": {"head_dim": 4}}, "fla's attention heads split the model's width"),
        ("T*M", {"deltanet": {"norm_eps": 1e-6}}, "mixes deltanet, attention, mamba2"),
    ):
        checkpoint = save_checkpoint(tmp_path / pattern, small_model(small_config(pattern, mixers=mixers, norm_eps=1e-6)))
        assert convert(["to-hf", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "hf"), "--format", "native"]) == 2
        assert error in capsys.readouterr().err and not (tmp_path / "hf").exists()
    (tmp_path / "fla").mkdir()
    two_attentions = [{"layers": [0], "num_heads": 2}, {"layers": [1], "num_heads": 4}]
    for config, error in (({"use_gate": False}, "use_gate: false"), ({"attn": two_attentions, "num_hidden_layers": 3}, "share one config")):
        (tmp_path / "fla" / "config.json").write_text(json.dumps({"architectures": ["GatedDeltaNetForCausalLM"], "model_type": "gated_deltanet", **config}))
        assert convert(["from-hf", "--model", str(tmp_path / "fla"), "--output", str(tmp_path / "back")]) == 2
        assert error in capsys.readouterr().err and not (tmp_path / "back").exists()


@pytest.mark.parametrize("files", ["sharded-safetensors", "pytorch_model.bin"])
def test_a_mamba2_made_by_transformers_imports(tmp_path: Path, files: str) -> None:
    from safetensors.torch import load_file
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    config = Mamba2Config(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, head_dim=8, num_heads=8,
        n_groups=2, chunk_size=8, conv_kernel=4, tie_word_embeddings=True,
    )
    theirs = Mamba2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", "conv1d.bias")):
                p.add_(0.3 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "theirs", max_shard_size="20KB")  # transformers' own index and shards
    assert (tmp_path / "theirs" / "model.safetensors.index.json").is_file()
    if files == "pytorch_model.bin":
        shards = sorted((tmp_path / "theirs").glob("*.safetensors"))
        torch.save({k: v for shard in shards for k, v in load_file(shard).items()}, tmp_path / "theirs" / "pytorch_model.bin")
        for path in [*shards, tmp_path / "theirs" / "model.safetensors.index.json"]:
            path.unlink()
    from_hf(tmp_path / "theirs", tmp_path / "run")
    ids = token_ids(vocab=96, shape=(2, 19))
    # transformers keeps the residual stream in float32 (residual_in_fp32): the same in float32
    torch.testing.assert_close(logits(reloaded(tmp_path / "run"), ids), logits(theirs, ids), rtol=0, atol=TOL)
