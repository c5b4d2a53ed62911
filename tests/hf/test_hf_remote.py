"""`to-hf --format remote`: every mixer alone and a hybrid of all of them load with
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` and give ebb's logits
(float32, 1e-5), and `from-hf` brings them back into ebb with the same logits; the folder imports
with no ebb on the path; `labels=` gives ebb's loss; greedy `generate()` equals
`pretrain.generate`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from models.mixers import PATTERN
from pretrain.data.tokenizer import ByteTokenizer
from pretrain.generate import generate as ebb_generate
from tests.hf.helpers import HYBRID, from_hf, logits, reloaded, save_checkpoint, small_config, small_model, to_hf, token_ids

torch.set_num_threads(1)
TOL = 1e-5


def load_remote(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A model with every mixer (a windowed attention with qkv bias, so the KV cache is windowed),
    saved by the lazy checkpointer and exported."""
    tmp = tmp_path_factory.mktemp("hybrid")
    cfg = small_config(HYBRID, mixers={"attention": {"window_size": 5, "qkv_bias": True}}, tie_embeddings=False)
    model = small_model(cfg)
    to_hf(save_checkpoint(tmp / "run" / "checkpoints", model, mode="lazy"), tmp / "hf", "--dtype", "fp32")
    return model, tmp / "hf"


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*PATTERN, HYBRID], ids=[*PATTERN.values(), "hybrid"])
def test_export_and_import_keep_the_logits(tmp_path: Path, kind: str) -> None:
    model = small_model(small_config(kind))
    to_hf(save_checkpoint(tmp_path / "run" / "checkpoints", model), tmp_path / "hf", "--dtype", "fp32")
    ids = token_ids()
    expected = logits(model, ids)
    assert expected.abs().max() > 0.1
    exported = load_remote(tmp_path / "hf")
    assert type(exported).__name__ == "EbbForCausalLM"
    torch.testing.assert_close(logits(exported, ids), expected, rtol=0, atol=TOL)
    from_hf(tmp_path / "hf", tmp_path / "back")
    torch.testing.assert_close(logits(reloaded(tmp_path / "back"), ids), expected, rtol=0, atol=TOL)


def test_labels_give_ebbs_loss(hybrid) -> None:
    model, folder = hybrid
    exported = load_remote(folder)
    ids = token_ids(shape=(2, 11))
    labels = ids.clone()
    labels[0, 4] = -100
    with torch.no_grad():
        out = exported(ids, labels=labels)
        expected = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=TOL)
    assert out.aux_loss is not None and out.aux_loss > 0  # MoM's and SSE's balance losses, apart


def test_greedy_generate_equals_pretrain_generate(hybrid) -> None:
    """Prefill then one token at a time through the cache: recurrent states for the linear mixers,
    a windowed KV cache for attention (20 new tokens, window 5)."""
    model, folder = hybrid
    exported = load_remote(folder)
    prompt = ByteTokenizer().encode("def main(")
    expected = ebb_generate(model, prompt, 20, temperature=0.0, eos_id=256, vocab_size=257)
    out = exported.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
    new = out[0, len(prompt):].tolist()
    assert new[: len(expected)] == expected and new[len(expected):] in ([], [256])  # HF keeps the eos it stops at
    assert len(expected) > 5


@pytest.mark.slow
def test_folder_imports_without_ebb(hybrid, tmp_path: Path) -> None:
    """A fresh interpreter, elsewhere, with no ebb on its path: the folder's own code runs."""
    model, folder = hybrid
    ids = token_ids()
    torch.save({"ids": ids, "logits": logits(model, ids)}, tmp_path / "expected.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
expected = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], rtol=0, atol={TOL})
assert tokenizer.decode(tokenizer("héllo <|endoftext|>")["input_ids"]) == "héllo <|endoftext|>"
assert not any(name.split(".")[0] in ("models", "common", "checkpoint", "pretrain") for name in sys.modules)
print("ok", type(model).__module__)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok transformers_modules." in result.stdout


def test_folder_holds_config_weights_tokenizer_and_generation_config(hybrid) -> None:
    _, folder = hybrid
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["EbbForCausalLM"] and config["auto_map"]["AutoModelForCausalLM"] == "modeling_ebb.EbbForCausalLM"
    assert config["ebb_model"]["pattern"] == HYBRID and config["tie_word_embeddings"] is False
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 256 and generation["suppress_tokens"] == list(range(257, 320))
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "modeling_ebb.py", "configuration_ebb.py"} <= {p.name for p in folder.iterdir()}
