"""Convert between ebb checkpoints and Hugging Face model folders, both ways, one tensor at a time.

    python -m checkpoint.convert to-hf --checkpoint RUN_DIR_OR_CHECKPOINT [--step N] --output HF_DIR
        [--dtype bf16|fp32] [--format remote|native] [--max-shard-size 5GB] [--overwrite]
    python -m checkpoint.convert from-hf --model HF_DIR --output RUN_DIR [--overwrite]

to-hf reads only the model weights of any committed checkpoint (any tp x pp x dp layout it was
saved under, any optimizer codec, any checkpoint mode), after checking its files against the
manifest as resume does, and writes `config.json`, the weights as safetensors (sharded with an
index above --max-shard-size), the tokenizer (ebb's byte tokenizer as a real Hugging Face
tokenizer, or the run's own one) and `generation_config.json`:
- `--format remote` (the default), any pattern: `EbbForCausalLM` with ebb's model code in the
  folder (`AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)`);
- `--format native`: the class of the library that defines the architecture, where there is one
  (a Mamba2-only model without MLPs -> transformers' Mamba2ForCausalLM; attention-only ->
  LlamaForCausalLM, Qwen2ForCausalLM with qkv bias, MistralForCausalLM with a window; Gated
  DeltaNet, DeltaNet and Gated DeltaProduct -> fla's GatedDeltaNetForCausalLM,
  DeltaNetForCausalLM and GatedDeltaProductForCausalLM, with or without attention blocks), from
  each mixer's declaration (`MixerSpec.hf`).

from-hf reads such a folder, or one of transformers' Mamba2/Llama/Qwen2/Mistral models or fla's
(Gated) DeltaNet and Gated DeltaProduct ones, and
writes RUN_DIR/config.yaml and a weights-only checkpoint RUN_DIR/checkpoints/step-00000000
through ebb's commit protocol (manifest and checksums). `python -m pretrain.train --config
RUN_DIR/config.yaml --resume [overrides]` then trains on from those weights, with a fresh
optimizer, schedule and data position.

Each tensor is read (DCP's reader, or safetensors' memory map), converted and written before the
next is read, so a conversion holds about one tensor, never the whole model. Bad input stops with
one `error:` line and exit code 2, and nothing written: the output is made in a temporary
directory beside it and renamed into place at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from checkpoint import CheckpointError, dcp, manager
from checkpoint.ranks import Ranks
from checkpoint.safetensors_files import Entry, HFWeights, write_safetensors
from common.errors import first_line

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?", re.IGNORECASE)
UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
IGNORED_HF_WEIGHTS = re.compile(r".*\.rotary_emb\.inv_freq$")  # a buffer older transformers saved


class ConvertError(ValueError):
    """Bad input to a conversion: printed as one `error:` line, exit code 2."""


# --- where things are ---------------------------------------------------------------------------


def find_checkpoint(path: Path, step: int | None) -> Path:
    """`path` itself, or its latest (or `step`'s) committed checkpoint, or that under path/checkpoints."""
    if step is None:
        return manager.resolve_checkpoint(path)
    name = manager.step_dir_name(step)
    for candidate in (path, path / name, path / "checkpoints" / name):
        if candidate.name == name and (candidate / dcp.DCP_METADATA).is_file():
            return candidate
    raise CheckpointError(f"no committed checkpoint {name} at {path} or under {path / 'checkpoints'}")


def run_config(checkpoint: Path, given: Path) -> dict[str, Any]:
    """The run config saved with the checkpoint (else the run directory's), as a YAML tree."""
    for path in (checkpoint / "config.yaml", given / "config.yaml"):
        if path.is_file():
            try:
                tree = yaml.safe_load(path.read_text())
            except yaml.YAMLError as exc:
                raise ConvertError(f"{path} is not valid YAML: {first_line(exc)}") from None
            if not isinstance(tree, dict):
                raise ConvertError(f"{path} must hold a mapping of sections")
            return tree
    raise ConvertError(f"no config.yaml in {checkpoint} or {given}: cannot tell which model the weights are")


def model_config(tree: dict[str, Any], source: Path):
    from pydantic import ValidationError

    from models.config import ModelConfig

    try:
        return ModelConfig.model_validate(tree.get("model") or {})
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in ("model", *error["loc"]))
        raise ConvertError(f"{source}: config key {key}: {error['msg'].removeprefix('Value error, ')}") from None


def max_shard_bytes(text: str) -> int:
    match = SIZE.fullmatch(text.strip())
    if not match:
        raise ConvertError(f"--max-shard-size {text!r}: give bytes or a size such as 5GB or 500MiB")
    return int(float(match.group(1)) * UNITS[match.group(2) and match.group(2).upper()])


class Output:
    """A folder made in a temporary directory beside its destination and renamed there at the end."""

    def __init__(self, path: Path, overwrite: bool):
        self.path = path
        if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
            raise ConvertError(f"{path} already exists (pass --overwrite to replace it)")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()

    def commit(self) -> None:
        if not self.path.exists():
            os.rename(self.tmp, self.path)
            return
        old = self.path.parent / f".old-{self.path.name}-{os.getpid()}"
        os.rename(self.path, old)
        os.rename(self.tmp, self.path)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def meta_model(model_cfg):
    """The ebb model's parameters (names in order, shapes, dtypes) without allocating them."""
    from models.model import HybridLM

    with torch.device("meta"):
        return HybridLM(model_cfg)


# --- to-hf --------------------------------------------------------------------------------------


def to_hf(args: argparse.Namespace) -> str:
    from models.hf.native import exported_names, hf_config, native_format, remote_format
    from models.hf.remote_code import write_remote_code
    from models.hf.tokenizer import write_tokenizer

    checkpoint = find_checkpoint(args.checkpoint, args.step)
    manager.verify_together(Ranks(None), checkpoint)  # the files match the manifest, as resume checks
    tree = run_config(checkpoint, args.checkpoint)
    model = model_config(tree, checkpoint)
    fmt = native_format(model) if args.format == "native" else remote_format()
    reader = dcp.ModelReader(checkpoint)
    stored = reader.tensors
    params = meta_model(model).state_dict()
    for name, param in params.items():
        if name not in stored:
            raise ConvertError(f"{checkpoint.name} has no weight {name}: its config.yaml does not describe its weights")
        if tuple(stored[name].size) != tuple(param.shape):
            raise ConvertError(f"{checkpoint.name}: {name} is {tuple(stored[name].size)}, the config says {tuple(param.shape)}")
    names = list(exported_names(model, list(params)))
    out_dtype = {
        name: DTYPES[args.dtype] if args.dtype and stored[name].properties.dtype.is_floating_point else stored[name].properties.dtype
        for name in names
    }
    entries = [Entry(fmt.hf_name(name), tuple(stored[name].size), out_dtype[name]) for name in names]
    shard_bytes = max_shard_bytes(args.max_shard_size)
    tokenizer = str((tree.get("data") or {}).get("tokenizer", "byte")) if args.tokenizer is None else args.tokenizer

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, entry in zip(names, entries):
            tensor = fmt.to_hf(model, name, reader.read(name))
            yield entry.name, tensor.to(out_dtype[name])

    out = Output(args.output, args.overwrite)
    try:
        try:
            vocab, token_ids = write_tokenizer(tokenizer, out.tmp)
        except (OSError, ValueError) as exc:
            raise ConvertError(f"cannot export tokenizer {tokenizer}: {first_line(exc)}") from None
        config_dtype = str(out_dtype[names[0]]).removeprefix("torch.")
        hf_config(fmt, model, config_dtype, token_ids).save_pretrained(str(out.tmp))
        generation_config(model, vocab, token_ids).save_pretrained(str(out.tmp))
        if fmt.native is None:
            write_remote_code(out.tmp)
        files = write_safetensors(out.tmp, entries, tensors(), shard_bytes)
        out.commit()
    except BaseException:
        out.discard()
        raise
    size = sum(e.nbytes for e in entries)
    return (
        f"ebb: wrote {args.output} ({fmt.architecture}, {len(entries)} tensors, {size / 1e6:.1f} MB {config_dtype} "
        f"in {len(files) if len(files) == 1 else len(files) - 1} file(s)) from {checkpoint}"
    )


def generation_config(model, tokenizer_vocab: int, token_ids: dict[str, int | None]):
    """Greedy by default; ids past the tokenizer's vocabulary (the padded rows of the embedding)
    are never generated, as `pretrain.generate` samples only below the tokenizer's size."""
    from transformers import GenerationConfig

    config = GenerationConfig(**{k: v for k, v in token_ids.items() if v is not None})
    if tokenizer_vocab < model.vocab_size:
        config.suppress_tokens = list(range(tokenizer_vocab, model.vocab_size))
    return config


# --- from-hf ------------------------------------------------------------------------------------


def _special_float(obj: dict[str, Any]) -> Any:
    """transformers writes inf and nan in config.json as {"__float__": "Infinity"} and the like."""
    if obj.keys() == {"__float__"} and obj["__float__"] in ("Infinity", "-Infinity", "NaN"):
        return float(obj["__float__"].replace("Infinity", "inf"))
    return obj


def hf_config_dict(folder: Path) -> dict[str, Any]:
    """config.json with its class's defaults filled in (for transformers' own model types)."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConvertError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        raw = json.loads(path.read_text(), object_hook=_special_float)
    except ValueError as exc:
        raise ConvertError(f"{path} is not valid JSON: {first_line(exc)}") from None
    if raw.get("model_type") in (None, "ebb"):
        return raw
    from transformers import AutoConfig

    try:
        return {**raw, **AutoConfig.for_model(raw["model_type"], **raw).to_dict()}
    except (ValueError, KeyError, TypeError):
        return raw  # a model type transformers does not know: the architecture check names it


def from_hf(args: argparse.Namespace) -> str:
    from models.hf.native import FormatError, import_format
    from models.hf.tokenizer import BYTE, is_byte_tokenizer, load_hf_tokenizer

    folder = args.model
    if not folder.is_dir():
        raise ConvertError(f"{folder} is not a directory")
    fmt, model = import_format(hf_config_dict(folder))
    try:
        weights = HFWeights(folder)
    except (OSError, ValueError) as exc:
        raise ConvertError(f"cannot read the weights of {folder}: {first_line(exc)}") from None
    params = meta_model(model).state_dict()
    sources = {name: fmt.hf_name("embed.weight" if model.tie_embeddings and name == "lm_head.weight" else name) for name in params}
    for name, param in params.items():
        if sources[name] not in weights:
            raise ConvertError(f"{folder} has no weight {sources[name]}, which {fmt.architecture} should have")
        shape = weights.shape(sources[name])
        if shape != tuple(param.shape):
            raise ConvertError(f"{folder}: {sources[name]} is {shape}, its config says {tuple(param.shape)}")
    unused = sorted(set(weights.names()) - set(sources.values()) - {n for n in weights.names() if IGNORED_HF_WEIGHTS.match(n)})
    if unused:
        raise FormatError(f"{folder} has weights ebb's {fmt.architecture} import has no place for: {', '.join(unused[:3])}{' ...' if len(unused) > 3 else ''}")

    def fetch(name: str) -> torch.Tensor:
        return fmt.from_hf(model, name, weights.get(sources[name])).to(params[name].dtype).contiguous()

    if is_byte_tokenizer(folder):
        tokenizer = BYTE
    elif (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        tokenizer = None  # the folder's own, copied into RUN_DIR/tokenizer below
    else:
        tokenizer = BYTE  # no tokenizer in the folder: the run config's default; say so
    out = Output(args.output, args.overwrite)
    try:
        data: dict[str, Any] = {"tokenizer": tokenizer}
        if tokenizer is None:
            try:
                load_hf_tokenizer(str(folder)).save_pretrained(str(out.tmp / "tokenizer"))
            except (OSError, ValueError) as exc:
                raise ConvertError(f"cannot copy the tokenizer of {folder}: {first_line(exc)}") from None
            data["tokenizer"] = str((args.output / "tokenizer").resolve())
        text = yaml.safe_dump({"model": model.model_dump(mode="json"), "data": data, "train": {"run_dir": str(args.output)}}, sort_keys=False)
        (out.tmp / "config.yaml").write_text(text)
        write_weights_only_checkpoint(out.tmp / "checkpoints", params, fetch, text, fmt.architecture)
        out.commit()
    except BaseException:
        out.discard()
        raise
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    note = "" if has_tokenizer else " (no tokenizer in the folder: data.tokenizer is byte)"
    return (
        f"ebb: wrote {args.output}/checkpoints/{manager.step_dir_name(0)} from {fmt.architecture} ({len(params)} tensors){note}; "
        f"continue with: python -m pretrain.train --config {args.output}/config.yaml --resume"
    )


def write_weights_only_checkpoint(root: Path, params: dict[str, torch.Tensor], fetch, config_text: str, source: str) -> Path:
    """Step 0 under `root`, through the commit protocol every ebb checkpoint goes through."""
    ranks = Ranks(None)
    staging = manager.prepare(ranks, root, 0)
    shapes = {name: (param.shape, param.dtype) for name, param in params.items()}
    with dcp.write_errors(staging):
        checksums = dcp.write_weights_only(staging, shapes, fetch, step=0)
        (staging / "config.yaml").write_text(config_text)
    return manager.commit(ranks, root, 0, {"world_size": 1, "from_hf": source}, keep_last=1, checksums=checksums)


# --- the command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m checkpoint.convert", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    out = commands.add_parser("to-hf", help="an ebb checkpoint -> a Hugging Face model folder")
    out.add_argument("--checkpoint", required=True, type=Path, help="a run dir, its checkpoints dir, or one step-* checkpoint")
    out.add_argument("--step", type=int, default=None, help="this step's checkpoint instead of the latest")
    out.add_argument("--output", required=True, type=Path)
    out.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="the weights' dtype (default: as stored)")
    out.add_argument("--format", choices=("remote", "native"), default="remote")
    out.add_argument("--max-shard-size", default="5GB", help="above this the weights are sharded, with an index")
    out.add_argument("--tokenizer", default=None, help="'byte' or a local tokenizer (default: the run config's data.tokenizer)")
    out.add_argument("--overwrite", action="store_true")
    back = commands.add_parser("from-hf", help="a Hugging Face model folder -> an ebb run dir with a step-0 checkpoint")
    back.add_argument("--model", required=True, type=Path, help="a folder written by to-hf, or a transformers Mamba2/Llama/Qwen2/Mistral")
    back.add_argument("--output", required=True, type=Path, help="the run dir to create")
    back.add_argument("--overwrite", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from models.hf.native import FormatError
    from models.hf.remote_code import RemoteCodeError

    began = time.perf_counter()
    try:
        summary = to_hf(args) if args.command == "to-hf" else from_hf(args)
    except (ConvertError, CheckpointError, FormatError, RemoteCodeError) as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 2
    print(f"{summary} in {time.perf_counter() - began:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
