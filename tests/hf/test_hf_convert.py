"""The conversion command: bad input is one `error:` line, exit code 2 and nothing written; the
weights are sharded with an index above --max-shard-size and cast by --dtype; --step picks a
checkpoint; a from-hf run dir resumes training from the imported weights."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from checkpoint.convert import main as convert
from tests.hf.helpers import D_MODEL, from_hf, reloaded, save_checkpoint, small_config, small_model, to_hf

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run dir with checkpoints at steps 3 (sync) and 5 (async) of a small hybrid."""
    root = tmp_path_factory.mktemp("run")
    model = small_model(small_config("MG*"))
    save_checkpoint(root / "checkpoints", model, step=3)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    save_checkpoint(root / "checkpoints", model, step=5, mode="async")
    return root


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out |= {name: f.get_tensor(name) for name in f.keys()}
    return out


def fails(capsys, *argv: str) -> str:
    assert convert(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.slow
def test_shards_dtype_and_step(run: Path, tmp_path: Path) -> None:
    to_hf(run, tmp_path / "latest", "--dtype", "fp32")
    to_hf(run, tmp_path / "sharded", "--step", "3", "--dtype", "bf16", "--max-shard-size", "20KB")
    latest, sharded = weights(tmp_path / "latest"), weights(tmp_path / "sharded")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and set(index["weight_map"]) == set(sharded) == set(latest)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in sharded.values())
    assert all(t.dtype == torch.bfloat16 for t in sharded.values())
    assert json.loads((tmp_path / "sharded" / "config.json").read_text())["dtype"] == "bfloat16"
    step3 = small_model(small_config("MG*")).state_dict()  # the same seed: step 3's weights
    for name, tensor in sharded.items():
        assert torch.equal(tensor, step3[name.removeprefix("model.")].bfloat16()), name
    assert torch.equal(latest["model.embed.weight"], step3["embed.weight"] + 1.0)  # step 5


@pytest.mark.slow
def test_command_line(run: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "checkpoint.convert", "to-hf", "--checkpoint", str(run / "checkpoints"), "--output", str(tmp_path / "hf")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "EbbForCausalLM" in result.stdout and "step-00000005" in result.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "checkpoint.convert", "from-hf", "--model", str(tmp_path / "nothing"), "--output", str(tmp_path / "x")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'nothing'} is not a directory"]


@pytest.mark.slow
def test_bad_input_is_one_line_and_writes_nothing(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    assert "no checkpoint at" in fails(capsys, "to-hf", "--checkpoint", str(tmp_path / "empty"), "--output", str(out))
    assert "step-00000004" in fails(capsys, "to-hf", "--checkpoint", str(run), "--step", "4", "--output", str(out))
    assert "mixes mamba2, gated_deltanet, attention" in fails(capsys, "to-hf", "--checkpoint", str(run), "--output", str(out), "--format", "native")
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))

    # damaged: one byte of a shard flipped, the manifest no longer matches
    damaged = tmp_path / "damaged"
    save_checkpoint(damaged, small_model(small_config("*")), step=1)
    shard = next((damaged / "step-00000001").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "does not match its checksum" in fails(capsys, "to-hf", "--checkpoint", str(damaged), "--output", str(out))

    # the native format cannot express attention blocks without an MLP
    no_mlp = tmp_path / "no_mlp"
    save_checkpoint(no_mlp, small_model(small_config("**", mlp="none")), step=1)
    err = fails(capsys, "to-hf", "--checkpoint", str(no_mlp), "--output", str(out), "--format", "native")
    assert "model.mlp is none" in err and "SwiGLU" in err
    assert not out.exists()

    # an existing output folder, unless --overwrite
    out.mkdir()
    (out / "keep").write_text("x")
    assert "already exists" in fails(capsys, "to-hf", "--checkpoint", str(run), "--output", str(out))
    assert (out / "keep").exists()
    to_hf(run, out, "--overwrite")
    assert not (out / "keep").exists() and (out / "model.safetensors").exists()
    assert "already exists" in fails(capsys, "from-hf", "--model", str(out), "--output", str(out))

    # an architecture ebb cannot import
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    err = fails(capsys, "from-hf", "--model", str(gpt2), "--output", str(tmp_path / "run_out"))
    assert "cannot import architecture 'GPT2LMHeadModel'" in err and "LlamaForCausalLM" in err
    assert not (tmp_path / "run_out").exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
def test_from_hf_run_resumes_training(run: Path, tmp_path: Path) -> None:
    """`pretrain.train --resume` on the run dir from-hf wrote: steps 1 and 2 from the imported
    weights (at lr 1e-30, below every weight's float32 spacing, they stay those weights), with a fresh optimizer, schedule and data."""
    from pretrain.config import load_config
    from pretrain.train import train

    to_hf(run, tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "ebb")
    imported = reloaded(tmp_path / "ebb").state_dict()
    overrides = [
        "train.steps=2", "train.seq_len=16", "train.batch_size=2", "train.threads=1", "train.eval_interval=0",
        "data.embedded_max_bytes=30000", "optim.lr=1e-30", "optim.warmup_steps=0", "logging.progress=false", "logging.tensorboard=false",
    ]
    train(load_config(tmp_path / "ebb" / "config.yaml", overrides), resume=True)
    records = [json.loads(line) for line in (tmp_path / "ebb" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    trained = reloaded(tmp_path / "ebb")  # the newest checkpoint: step 2
    assert (tmp_path / "ebb" / "checkpoints" / "step-00000002").is_dir()
    assert all(torch.equal(trained.state_dict()[name], t) for name, t in imported.items())
    assert trained.embed.weight.shape == (320, D_MODEL)
