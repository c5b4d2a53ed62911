"""Tuned configs of fla's and liger-kernel's autotuned Triton kernels, per GPU: captured where
autotuning ran, shipped with ebb, applied at start-up so that a fresh machine skips autotuning.

Triton benchmarks every candidate config of an autotuned kernel at its first launch with a new key
(the key arguments' values and the tensors' dtypes): on a fresh machine fla's Gated DeltaNet
kernels take minutes. A *set* is what a run's autotuning chose, for one GPU: the directory
`<root>/<GPU>/` (the device name as fla spells its config folders, `NVIDIA_H100_80GB_HBM3`) of one
`<kernel>.json` per kernel in fla's format (`fla.ops.utils.cache`: `autotune_entries` keyed by the
md5 of the autotune key, each with its `autotune_key` and `config`; `triton_version`), with ebb's
fields beside it: `gpu`, `fla_version` (`liger_kernel_version` for liger's kernels) and each
entry's `module`. fla reads the same files for the kernels it decorates with its own cached
autotuner (`FLA_CONFIG_DIR=<root>/<GPU> FLA_CACHE_MODE=strict`).

Capture (`capture`) reads what the autotuners of this very process chose (their in-memory cache),
not Triton's on-disk cache: so a set holds exactly the kernels this run launched, with the versions
that ran them (a shared cache directory mixes fla and Triton versions and GPUs of one architecture,
and its files record none of them), including configs Triton never writes to disk (those with a
pre-hook, kernels not asked to cache). With `EBB_FLA_CONFIGS_CAPTURE=DIR`, training captures after
its first step and the GPU benches after each model.

Applying (`apply_for`, called by `models.ops.plan_model` on CUDA) gives each autotuner the set has
configs for a cache that, asked by Triton for a key it lacks, takes the set's config for that
launch, which Triton then launches without benchmarking (a launch of a key already in the cache
costs one Python call more). A launch takes the entry of its key, else one whose key differs only where it
counts tokens or sequences (`LENGTH_AND_BATCH`), and only a config that is one of the kernel's own
candidates and survives its pruning: a config this fla no longer offers is never launched. fla's
own loader covers only the kernels it decorates with its cached autotuner (in a training step of
ebb's Gated DeltaNet stack, 13 of the 19 autotuned: the fused RMSNorm's, gated output norm's and
SwiGLU's are plain `triton.autotune`) and no liger kernel, and its `fuzzy` mode would also take
another head dim or block size, whose config may not even compile there. A set applies only with
the fla and Triton versions it was captured with (`EBB_FLA_CONFIGS`: `auto`, the sets shipped in
`kernel_configs/`; `off`; or a directory of sets).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.imports import optional_attribute

SHIPPED = Path(__file__).with_name("kernel_configs")
PACKAGES = ("fla", "liger_kernel")  # whose autotuned kernels a set holds
VERSION_FIELDS = {"fla": "fla_version", "triton": "triton_version", "liger_kernel": "liger_kernel_version"}
NAMES = {"fla": "fla", "triton": "Triton", "liger_kernel": "liger-kernel"}
LENGTH_AND_BATCH = frozenset({"T", "B", "NB", "T_BUCKET", "bucket_M"})  # key arguments that count tokens or sequences
CONFIG_FIELDS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "ir_override")
CAPTURE_HINT = "EBB_FLA_CONFIGS_CAPTURE=DIR captures a set after the first step (README: GPU fast path)"
AUTOTUNES = "Triton autotunes fla's kernels in the first steps (minutes on a fresh machine)"


class SetError(ValueError):
    """A set's files that cannot be read as one set."""


@dataclass(frozen=True)
class Entry:
    key: tuple  # Triton's autotune key: the key arguments' values, then every tensor argument's dtype
    config: dict[str, Any]  # {"kwargs": {...}, "num_warps": ..., ...}: fla's `config` field
    module: str | None  # the kernel's module (None in files ebb did not write)


@dataclass(frozen=True)
class KernelSet:
    gpu: str
    versions: dict[str, str]  # package -> the version it was captured with
    kernels: dict[str, list[Entry]]  # kernel name -> its entries

    def line(self) -> str:
        return f"ebb: fla kernel configs: {self.gpu}, {len(self.kernels)} kernels, {versions_text(self.versions)}"


@dataclass
class Usage:
    """What the applied set did for the launches of this process."""

    served: set[tuple[str, tuple]] = field(default_factory=set)  # (kernel, key) launched with a shipped config


def gpu_dir(gpu: str) -> str:
    """The folder of a GPU's set: its name as fla names its config folders."""
    return re.sub(r"[^0-9A-Za-z]+", "_", gpu).strip("_") or "unknown_gpu"


def versions_text(versions: dict[str, str | None]) -> str:
    return " / ".join(f"{NAMES[p]} {versions.get(p)}" for p in VERSION_FIELDS if p in versions)


def installed_versions() -> dict[str, str | None]:
    """fla's, Triton's and liger-kernel's versions here (None: not installed)."""
    def liger() -> str | None:
        try:
            return importlib.metadata.version("liger-kernel")
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"fla": optional_attribute("fla", "__version__"), "triton": optional_attribute("triton", "__version__"), "liger_kernel": liger()}


def key_hash(key: Iterable) -> str:
    """fla's name of an entry: the md5 of its key as compact, sorted JSON."""
    return hashlib.md5(json.dumps(list(key), separators=(",", ":"), sort_keys=True).encode()).hexdigest()


def config_dict(config: Any) -> dict[str, Any]:
    """A triton.Config as fla's files hold it."""
    return {"kwargs": dict(config.kwargs), **{f: getattr(config, f, None) for f in CONFIG_FIELDS}}


def as_tuple(value: Any) -> Any:
    return tuple(as_tuple(v) for v in value) if isinstance(value, list) else value


def kernel_of(tuner: Any) -> tuple[str, str]:
    """(module, name) of an autotuner's kernel function."""
    return tuner.base_fn.__module__, tuner.base_fn.__name__


# --- capture ---------------------------------------------------------------------------------

def autotuners() -> list[Any]:
    """Every autotuned kernel of fla and liger-kernel imported in this process (module globals,
    under any `triton.heuristics` wrapping)."""
    autotuner = optional_attribute("triton.runtime.autotuner", "Autotuner")
    kernel = optional_attribute("triton.runtime.jit", "KernelInterface")
    if autotuner is None or kernel is None:
        return []
    found: dict[int, Any] = {}
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in PACKAGES:
            continue
        for value in list(vars(module).values()):
            while isinstance(value, kernel) and not isinstance(value, autotuner):
                value = getattr(value, "fn", None)
            if isinstance(value, autotuner):
                found[id(value)] = value
    return list(found.values())


def chosen_entries(tuners: Iterable[Any]) -> dict[str, dict[str, dict]]:
    """kernel name -> {fla's entry name: entry} of what each autotuner chose (its cache)."""
    kernels: dict[str, dict[str, dict]] = {}
    for tuner in tuners:
        if len(tuner.configs) < 2:
            continue
        module, name = kernel_of(tuner)
        for key, config in tuner.cache.items():
            entry = {"autotune_key": list(key), "config": config_dict(config), "module": module}
            try:
                json.dumps(entry)
            except (TypeError, ValueError):
                continue  # a key or config JSON cannot hold; that launch autotunes
            kernels.setdefault(name, {})[key_hash(key)] = entry
    return kernels


def capture(root: Path, tuners: Iterable[Any] | None = None, gpu: str | None = None, installed: dict[str, str | None] | None = None) -> str:
    """Write what this process's autotuners chose into the set `root/<GPU>/` (merged into a set of
    the same versions there, replacing one of others); the line that says so."""
    kernels = chosen_entries(autotuners() if tuners is None else tuners)
    if not kernels:
        return "ebb: fla kernel configs: nothing to capture (no autotuned fla or liger-kernel kernel ran in this process)"
    gpu = gpu or torch.cuda.get_device_name()
    installed = installed_versions() if installed is None else installed
    directory = root / gpu_dir(gpu)
    try:
        existing = read_set(directory) if directory.is_dir() else None
    except SetError:
        existing = None
    replaced = ""
    if existing is not None and any(installed.get(p) != v for p, v in existing.versions.items()):
        replaced = f", replacing a set of {versions_text(existing.versions)}"
        existing = None
    directory.mkdir(parents=True, exist_ok=True)
    if existing is None:
        for old in directory.glob("*.json"):
            old.unlink()
    for name, entries in kernels.items():
        path = directory / f"{name}.json"
        if existing is not None and name in existing.kernels:
            entries = json.loads(path.read_text())["autotune_entries"] | entries
        write_kernel(path, name, gpu, installed, entries)
    total = read_set(directory)
    return (f"ebb: fla kernel configs: captured {len(kernels)} kernels ({sum(map(len, kernels.values()))} keys) into {directory}, "
            f"now {len(total.kernels)} kernels for {gpu}, {versions_text(total.versions)}{replaced}")


def write_kernel(path: Path, name: str, gpu: str, installed: dict[str, str | None], entries: dict[str, dict]) -> None:
    liger = any(str(e.get("module")).startswith("liger_kernel.") for e in entries.values())
    packages = ("fla", "triton", "liger_kernel") if liger else ("fla", "triton")
    data = {"kernel_name": name, "gpu": gpu, **{VERSION_FIELDS[p]: installed[p] for p in packages},
            "default_config": None, "autotune_entries": dict(sorted(entries.items()))}
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, path)


# --- reading and choosing ----------------------------------------------------------------------

def read_set(directory: Path) -> KernelSet:
    """The set in `directory`; SetError naming the file and what is wrong with it."""
    gpu, versions, kernels = None, {}, {}
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            entries = data["autotune_entries"]
            kernels[data.get("kernel_name") or path.stem] = [
                Entry(as_tuple(e["autotune_key"]), e["config"], e.get("module")) for e in entries.values() if isinstance(e["config"]["kwargs"], dict)
            ]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SetError(f"{path.name}: not a kernel config file ({type(exc).__name__}: {exc})") from None
        if not all(VERSION_FIELDS[p] in data for p in ("fla", "triton")):
            raise SetError(f"{path.name} does not record the fla and Triton versions it was captured with")
        for package, name in VERSION_FIELDS.items():
            if name in data and versions.setdefault(package, data[name]) != data[name]:
                raise SetError(f"its files were captured with different {NAMES[package]} versions ({versions[package]}, {data[name]})")
        gpu = gpu or data.get("gpu")
    if not kernels:
        raise SetError("no <kernel>.json files")
    return KernelSet(gpu or directory.name, versions, kernels)


def plan(gpu: str, installed: dict[str, str | None], setting: str | None = None) -> tuple[KernelSet | None, str]:
    """The set to apply on this GPU with these versions under `EBB_FLA_CONFIGS` (`setting`), and
    the header's line about it."""
    setting = os.environ.get("EBB_FLA_CONFIGS", "auto") if setting is None else setting
    if setting == "off":
        return None, f"ebb: fla kernel configs: off (EBB_FLA_CONFIGS=off); {AUTOTUNES}"
    root = SHIPPED if setting in ("", "auto") else Path(setting)
    directory = root / gpu_dir(gpu)
    if not directory.is_dir():
        where = "shipped" if root == SHIPPED else f"in {root}"
        here = versions_text({p: installed.get(p) for p in ("fla", "triton")})
        return None, f"ebb: fla kernel configs: none {where} for {gpu} ({here}); {AUTOTUNES}; {CAPTURE_HINT}"
    try:
        kernel_set = read_set(directory)
    except SetError as exc:
        return None, f"ebb: warning: fla kernel configs in {directory} not used: {exc}; {AUTOTUNES}"
    if any(installed.get(p) != v for p, v in kernel_set.versions.items()):
        here = versions_text({p: installed.get(p) for p in kernel_set.versions})
        return None, (f"ebb: warning: fla kernel configs for {kernel_set.gpu} in {directory} were captured with "
                      f"{versions_text(kernel_set.versions)}, not {here} as here: not used; {AUTOTUNES}; {CAPTURE_HINT}")
    return kernel_set, kernel_set.line()


def tuning_key(tuner: Any, args: tuple, kwargs: dict) -> tuple[tuple, tuple]:
    """Triton's autotune key of a launch (as `Autotuner.run` builds it) and each entry's argument
    name (None for the dtypes)."""
    named = {n: v for n, v in {**dict(zip(tuner.arg_names, args)), **kwargs}.items() if n in tuner.arg_names}
    names = [k for k in tuner.keys if k in named]
    dtypes = [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(named[k] for k in names) + tuple(dtypes), tuple(names) + (None,) * len(dtypes)


def alike(shipped: tuple, key: tuple, names: tuple) -> bool:
    """Whether two keys differ at most where they count tokens or sequences."""
    return len(shipped) == len(key) and all(a == b or n in LENGTH_AND_BATCH for a, b, n in zip(shipped, key, names))


def shipped_config(kernel_set: KernelSet, tuner: Any, args: tuple, kwargs: dict, key: tuple, names: tuple) -> Any | None:
    """The candidate config of `tuner` the set holds for this launch, or None."""
    module, name = kernel_of(tuner)
    entries = [e for e in kernel_set.kernels.get(name, ()) if e.module in (None, module)]
    exact = [e for e in entries if e.key == key]
    for entry in exact + [e for e in entries if e not in exact and alike(e.key, key, names)]:
        candidate = next((c for c in tuner.configs if config_dict(c) == entry.config), None)
        prune = getattr(tuner, "early_config_prune", None)
        if candidate is not None and (prune is None or candidate in prune(tuner.configs, dict(zip(tuner.arg_names, args)), **kwargs)):
            return candidate
    return None


class SeedingCache(dict):
    """An autotuner's cache (Triton's key -> config) that, asked for a key it lacks, takes the set's
    config for that launch where it has one: Triton then launches it without benchmarking. Only a
    miss costs anything; `launch` is the launch's arguments, noted by the autotuner's `run`."""

    def __init__(self, tuner: Any, kernel_set: KernelSet, usage: Usage):
        super().__init__(tuner.cache)
        self.tuner, self.kernel_set, self.usage = tuner, kernel_set, usage
        self.launch: tuple[tuple, dict] = ((), {})

    def __contains__(self, key: object) -> bool:
        if dict.__contains__(self, key):
            return True
        args, kwargs = self.launch
        launched, names = tuning_key(self.tuner, args, kwargs)
        config = shipped_config(self.kernel_set, self.tuner, args, kwargs, launched, names) if launched == key else None
        if config is None:
            return False
        self[key] = config
        self.usage.served.add((kernel_of(self.tuner)[1], key))
        return True


# --- applying ----------------------------------------------------------------------------------

usage = Usage()
_seeding: list[Any] = []  # the autotuners whose cache seeds from the active set


def activate(kernel_set: KernelSet | None) -> None:
    """Launch fla's and liger-kernel's autotuned kernels (those imported by now: fla imports all of
    its own) with `kernel_set`'s configs from now on; None: autotune them as Triton does."""
    for tuner in _seeding:
        del tuner.run  # the class's again
        tuner.cache = dict(tuner.cache)
    _seeding.clear()
    if kernel_set is None:
        return
    for tuner in autotuners():
        if kernel_of(tuner)[1] in kernel_set.kernels and len(tuner.configs) > 1:
            seed_from(kernel_set, tuner)
            _seeding.append(tuner)


def seed_from(kernel_set: KernelSet, tuner: Any) -> None:
    """Give `tuner` a cache seeding from `kernel_set`, and a `run` that notes each launch's arguments for it."""
    cache = tuner.cache = SeedingCache(tuner, kernel_set, usage)
    run = type(tuner).run

    def run_noting_launch(*args, **kwargs):
        cache.launch = (args, kwargs)
        try:
            return run(tuner, *args, **kwargs)
        finally:
            cache.launch = ((), {})  # holding the launch's tensors would keep them alive

    tuner.run = run_noting_launch


@functools.cache
def _apply(gpu: str, setting: str) -> str:
    kernel_set, line = plan(gpu, installed_versions(), setting)
    activate(kernel_set)
    return line


def apply_for(device: torch.device) -> str | None:
    """At start-up: apply the set for this GPU (once per process); the header's line about it,
    None off CUDA or without fla."""
    if device.type != "cuda" or optional_attribute("fla", "__version__") is None:
        return None
    return _apply(torch.cuda.get_device_name(device), os.environ.get("EBB_FLA_CONFIGS", "auto"))


def capture_from_env() -> str | None:
    """Capture into `EBB_FLA_CONFIGS_CAPTURE`, where set (on CUDA); the line that says what was written."""
    target = os.environ.get("EBB_FLA_CONFIGS_CAPTURE")
    if not target:
        return None
    if not torch.cuda.is_available():
        return "ebb: fla kernel configs: nothing captured (EBB_FLA_CONFIGS_CAPTURE needs a CUDA GPU)"
    try:
        return capture(Path(target))
    except OSError as exc:  # a run goes on without its capture
        return f"ebb: warning: fla kernel configs not captured into {target}: {exc}"
