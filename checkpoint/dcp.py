"""The training state in the torch.distributed.checkpoint (DCP) layout: capture, write, load.

A checkpoint directory holds:
- `.metadata` + `*.distcp`: DCP, with keys `model.<fqn>` and `optimizer.<...>` (the FQN-keyed
  forms of `torch.distributed.checkpoint.state_dict`), so it reshards across layouts and can be
  loaded offline;
- `trainer_state.pt`: the small non-tensor state, `{step, schedule, data, rng}`, written by
  rank 0 with `torch.save` and read by every rank with `weights_only=True` (the data position is
  in global rows, the same on every rank; the RNG restored everywhere is rank 0's).

A weights-only checkpoint (`{step}` alone in `trainer_state.pt`, only `model.` keys in DCP: what
`python -m checkpoint.convert from-hf` writes at step 0) resumes as a fresh run whose weights are
the checkpoint's: optimizer, schedule, data position and RNG start as a new run's do.

(`checkpoint/manager.py` adds `manifest.json` and the commit.) Files are written by
checkpoint/storage.py (around the page cache, checksummed on the way), without torch.save's
own per-record zip CRC-32: the manifest's checksums cover every byte already, and that CRC
(miniz's, about 0.5 GB/s) was most of a flush's CPU time. Under a process group every rank
writes and loads its own part of the model and optimizer (DTensors under TP/FSDP, its stages
under PP). The optimizer state is flattened
(`param_groups.<fqn>.lr`, `state.<fqn>.exp_avg`), so each parameter's state is found by its name
whichever rank holds it: a checkpoint saved under one tp x pp x dp layout loads under another.
Every optimizer state is saved in its global form (optim/shards.py), low-bit codes and block
scales included, so DCP reshards each one exactly. A master copy the checkpoint lacks (saved
without master weights, or an fp32 parameter's under offload) is taken from the loaded weights.
"""
from __future__ import annotations

import copy
import fnmatch
import random
import re
import warnings
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dist_cp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlanner, WriteItem
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from checkpoint import CheckpointError
from checkpoint.storage import ShardWriter
from common.errors import first_line

TRAINER_STATE = "trainer_state.pt"
MASTER = re.compile(r"state\.(?P<fqn>.+)\.master")  # a master copy's flattened optimizer key
CODES = re.compile(r"state\.(?P<fqn>.+)\.exp_avg_(?P<codec>[a-z0-9]+)")  # the first moment's codes under a low-bit codec
DCP_METADATA = ".metadata"
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
SINGLE_PROCESS_WARNING = r"torch\.distributed is .* single process"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextmanager
def _single_process_quietly() -> Iterator[None]:
    """DCP warns on every call made without a process group, which is our single-process mode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
        yield


def capture_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`{"model", "optimizer"}` state dicts whose tensors are the live ones (no copy): DTensors
    under TP/FSDP, any dtype (low-bit optimizer codes and scales included)."""
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    return {"model": model_state, "optimizer": optim_state}


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors and plain Python values
    (so that `torch.load(weights_only=True)` can read them back)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture_trainer_state(step: int, schedule: Stateful, data: Stateful) -> dict[str, Any]:
    """The small non-tensor state, copied now so that later steps cannot change it."""
    return copy.deepcopy({"step": step, "schedule": schedule.state_dict(), "data": data.state_dict(), "rng": rng_state()})


@contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """A failed DCP write (disk full, permission, ...) as a one-line CheckpointError naming `path`."""
    try:
        yield
    except CheckpointException as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {first_line(_root_cause(exc))}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {first_line(exc)}") from None


@contextmanager
def _without_zip_crc() -> Iterator[None]:
    """torch.save skips its zip CRC-32 meanwhile (process-wide: the setting is global;
    torch.load does not check it)."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def write_state(
    path: Path, state: dict[str, Any], planner: SavePlanner | None = None, group: dist.ProcessGroup | None = None, file_per_tensor: bool = False,
    in_plan_order: bool = False,
) -> dict[str, str]:
    """DCP-save `state` into the existing directory `path` (every rank of `group` calls it);
    returns the checksums of the files this rank wrote, by name. `in_plan_order`: see `ShardWriter`."""
    writer = ShardWriter(path, file_per_tensor, in_plan_order)
    with write_errors(path), _single_process_quietly(), _without_zip_crc():
        dist_cp.save(state, storage_writer=writer, planner=planner, process_group=group, no_dist=_no_dist())
    return writer.checksums


def start_async_write(path: Path, state: dict[str, Any], stager: AsyncStager, group: dist.ProcessGroup | None) -> tuple[Future | None, Future, ShardWriter]:
    """DCP `async_save` of `state` into `path`, as stock as the baseline should be: (staging done,
    upload done, the writer holding the checksums once uploaded). The first future is None when
    the stager copied on this thread before returning."""
    writer = ShardWriter(path)
    with write_errors(path), _single_process_quietly():
        response = dist_cp.async_save(state, storage_writer=writer, process_group=group, async_stager=stager, no_dist=_no_dist())
    if isinstance(response, AsyncSaveResponse):
        return response.staging_completion, response.upload_completion, writer
    return None, response, writer


def write_trainer_state(path: Path, trainer: dict[str, Any]) -> None:
    torch.save(trainer, path / TRAINER_STATE)


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Stateful, data: Stateful) -> int:
    """Restore everything `save` wrote, RNG included; returns the step the checkpoint was taken after.
    From a weights-only checkpoint only the weights: the rest stays as built, as a fresh run's."""
    trainer = _read_trainer_state(path)
    if weights_only(trainer):
        load_model(path, model)
        return int(trainer["step"])
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    reader = _MetadataOnce(path)
    saved = {key.removeprefix("optimizer.") for key in _metadata(path, reader).state_dict_metadata if key.startswith("optimizer.")}
    _refuse_fp32_where_quantised(path, optim_state, saved)
    derived = [key for key in optim_state if MASTER.fullmatch(key) and key not in saved]
    state = {"model": model_state, "optimizer": {k: v for k, v in optim_state.items() if k not in derived}}
    _dcp_load(path, state, reader)
    for key in derived:
        state["optimizer"][key] = model_state[MASTER.fullmatch(key)["fqn"]].detach().float()
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=OPTIONS)
    schedule.load_state_dict(trainer["schedule"])
    data.load_state_dict(trainer["data"])
    set_rng_state(trainer["rng"])
    return int(trainer["step"])


def _refuse_fp32_where_quantised(path: Path, optim_state: dict[str, Any], saved: set[str]) -> None:
    """A checkpoint holding torch's fp32 moments where this optimizer keeps a low-bit codec's:
    saved with another `optim.state_dtype`, or by an ebb that kept fp32 states for tensors whose
    shards split blocks. One line naming them and the override that loads it as it is."""
    found: dict[str, list[str]] = {}
    for key in optim_state:
        if (match := CODES.fullmatch(key)) and key not in saved and f"state.{match['fqn']}.exp_avg" in saved:
            found.setdefault(match["codec"], []).append(match["fqn"])
    if not found:
        return
    names = [name for group in found.values() for name in group]
    params = {key.split(".", 1)[1].rsplit(".", 1)[0] for key in optim_state if key.startswith("state.")}
    overrides = ", ".join(f"{{params: '{glob}', state_dtype: fp32}}" for glob in _globs(names, params))
    kept = " and ".join(f"{len(group)} as {codec}" for codec, group in found.items())
    raise CheckpointError(
        f"checkpoint {path} holds fp32 optimizer states (exp_avg, exp_avg_sq) for tensors this run keeps in a low-bit codec ({kept}, "
        f"e.g. {names[0]}): it was saved with another optim.state_dtype, or by an ebb that kept fp32 states where a layout split "
        f"blocks between ranks; to resume it, keep them fp32: optim.overrides=[{overrides}]"
    )


def _globs(names: list[str], every: set[str]) -> list[str]:
    """`names` as few globs as match them and nothing else of `every` (block indices as `*`)."""
    globs: list[str] = []
    for glob in dict.fromkeys(re.sub(r"\.\d+\.", ".*.", name) for name in names):
        matched = {name for name in every if fnmatch.fnmatchcase(name, glob)}
        globs += [glob] if matched <= set(names) else [name for name in names if name in matched]
    return globs


def load_model(path: Path, model: nn.Module) -> None:
    """Load only the model weights (for generation, evaluation, conversion)."""
    state = {"model": get_model_state_dict(model)}
    _dcp_load(path, state)
    set_model_state_dict(model, state["model"])


def weights_only(trainer: dict[str, Any]) -> bool:
    """Whether a checkpoint's trainer state says it holds the model weights alone."""
    return "schedule" not in trainer


class LazyModelPlanner(DefaultSavePlanner):
    """DCP's default plan for a state dict of meta tensors (shapes and dtypes alone), each tensor
    fetched by `fetch(name)` only when the writer needs it: one tensor in memory at a time."""

    def __init__(self, fetch: Any):
        super().__init__()
        self.fetch = fetch

    def resolve_data(self, write_item: WriteItem) -> Any:
        return self.fetch(write_item.index.fqn.removeprefix("model."))


def write_weights_only(path: Path, shapes: dict[str, tuple[torch.Size, torch.dtype]], fetch: Any, step: int) -> dict[str, str]:
    """DCP-save model weights into the existing directory `path` (one process), streamed: `shapes`
    names each parameter's shape and dtype, `fetch(name)` returns its tensor, and each tensor goes
    into a file of its own, so one is in memory at a time. Writes the trainer state of a
    weights-only checkpoint; returns the files' checksums."""
    state = {"model": {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in shapes.items()}}
    checksums = write_state(path, state, LazyModelPlanner(fetch), file_per_tensor=True)
    write_trainer_state(path, {"step": step})
    return checksums


class _MetadataOnce(dist_cp.FileSystemReader):
    """DCP's file reader, unpickling `.metadata` once however many loads it serves."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._metadata = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class ModelReader:
    """A checkpoint's model weights, read one whole tensor at a time through DCP's reader from
    whichever shards hold its pieces, however the ranks that saved it were laid out."""

    def __init__(self, path: Path):
        _check_layout(path)
        self.path = path
        self.reader = _MetadataOnce(path)
        metadata = _metadata(path, self.reader)
        self.tensors: dict[str, TensorStorageMetadata] = {  # by parameter name: global shape, dtype
            key.removeprefix("model."): meta
            for key, meta in metadata.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
        }

    def read(self, name: str) -> torch.Tensor:
        meta = self.tensors[name]
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        _dcp_load(self.path, {"model": {name: tensor}}, self.reader)
        return tensor


def _check_layout(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    for name in (DCP_METADATA, TRAINER_STATE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")


def _metadata(path: Path, reader: dist_cp.FileSystemReader) -> Any:
    """The checkpoint's DCP metadata (global shapes and dtypes by key)."""
    _check_layout(path)
    try:
        return reader.read_metadata()
    except Exception as exc:  # a damaged .metadata can raise almost anything
        raise CheckpointError(f"cannot load checkpoint {path}: {first_line(exc)}") from None


def _dcp_load(path: Path, state: dict[str, Any], reader: dist_cp.FileSystemReader | None = None) -> None:
    reader = reader or dist_cp.FileSystemReader(path)
    _metadata(path, reader)  # fails cleanly here rather than in DCP's logged fallbacks
    try:
        with _single_process_quietly():
            dist_cp.load(state, storage_reader=reader, no_dist=_no_dist())
    except CheckpointException as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: {first_line(_root_cause(exc))}") from None
    except Exception as exc:  # unpickling a damaged file can raise almost anything
        raise CheckpointError(f"cannot load checkpoint {path}: {first_line(exc)}") from None


def _read_trainer_state(path: Path) -> dict[str, Any]:
    _check_layout(path)
    try:
        return torch.load(path / TRAINER_STATE, weights_only=True)
    except Exception as exc:  # unpickling a damaged file can raise almost anything
        raise CheckpointError(f"cannot read {path / TRAINER_STATE}: {first_line(exc)}") from None


def _root_cause(exc: CheckpointException) -> BaseException:
    """DCP wraps each rank's failure as (exception, traceback) in `failures`."""
    for failure in exc.failures.values():
        if isinstance(failure, tuple) and failure and isinstance(failure[0], BaseException):
            return failure[0]
    return exc
