"""Tuned kernel configs (models/ops/fla_configs.py): a captured set round-trips through its files
in fla's format, applies only with the versions it was captured with, EBB_FLA_CONFIGS=off is
honoured, the header says which; a launch takes the config of its key, or of a key differing only in
tokens or sequences, and only one of the kernel's own candidates. On autotuners that stand in for
Triton's (CI has neither Triton nor fla); and on fla's own, in the last two tests: under Triton's
interpreter with fla installed (tests/models/test_fla_wiring.py has the commands) and on a GPU,
what a captured set holds is what fla's kernels launch, without benchmarking, and what fla's own
loader reads."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import models.layers.fla_modules as fla_modules
from common.imports import optional_attribute
from models.layers.norms import RMSNorm
from models.ops import dispatch, fla_configs
from tests.triton_interpreter import needs_interpreter  # before fla loads (models import it where used)

H100 = "NVIDIA H100 80GB HBM3"
VERSIONS = {"fla": "0.6.0", "triton": "3.6.0", "liger_kernel": None}


@dataclass(eq=False)
class Config:
    """What Triton's Config holds (equal by value, as Triton's is)."""

    kwargs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    num_ctas: int = 1
    maxnreg: int | None = None
    ir_override: str | None = None
    pre_hook: Any = None

    def __eq__(self, other):
        return fla_configs.config_dict(self) == fla_configs.config_dict(other) and self.pre_hook == other.pre_hook

    __hash__ = None


@dataclass
class Tuner:
    """What Triton's Autotuner holds that a set reads and writes, and how its `run` picks a launch's
    config: the key (the key arguments' values, then every tensor argument's dtype), then the
    cache, or a benchmark (here: noted, the first candidate taken)."""

    base_fn: Any
    arg_names: list[str]
    keys: list[str]
    configs: list[Config]
    cache: dict[tuple, Config] = field(default_factory=dict)
    early_config_prune: Any = None
    benchmarked: list[tuple] = field(default_factory=list)

    def run(self, *args, **kwargs) -> Config:
        named = {n: v for n, v in {**dict(zip(self.arg_names, args)), **kwargs}.items() if n in self.arg_names}
        key = tuple([named[k] for k in self.keys if k in named] + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])
        if key not in self.cache:
            self.benchmarked.append(key)
            self.cache[key] = self.configs[0]
        return self.cache[key]


def kernel(module: str, name: str):
    def fn():
        pass

    fn.__module__, fn.__name__ = module, name
    return fn


def chunk_o() -> Tuner:
    """Shaped as fla's chunk_fwd_kernel_o: key H, K, V, BT; candidates over BV and warps."""
    configs = [Config({"BV": bv}, num_warps=w) for bv in (32, 64) for w in (2, 4, 8)]
    return Tuner(kernel("fla.ops.common.chunk_o", "chunk_fwd_kernel_o"), ["q", "o", "T", "H", "K", "V", "BT"], ["H", "K", "V", "BT"], configs)


def cumsum() -> Tuner:
    """Shaped as fla's chunk_local_cumsum_scalar_kernel: its key counts the sequences (B)."""
    configs = [Config({}, num_warps=w) for w in (1, 2, 4, 8)]
    return Tuner(kernel("fla.ops.utils.cumsum", "chunk_local_cumsum_scalar_kernel"), ["s", "o", "T", "B", "H", "BT"], ["B", "H", "BT"], configs)


def launch(tuner: Tuner, **values) -> Config:
    """Launch with these arguments (in order, with the keywords Triton adds): the config taken."""
    return tuner.run(*(values[n] for n in tuner.arg_names), grid=(1,), warmup=False)



def tuned(tmp_path: Path, versions: dict = VERSIONS) -> tuple[Path, list[Tuner]]:
    """A set captured from two autotuners' recorded results: chunk_o at two head dims, cumsum at one packing."""
    o, c = chunk_o(), cumsum()
    o.cache[(6, 256, 512, 64, "torch.bfloat16", "torch.bfloat16")] = o.configs[4]
    o.cache[(6, 128, 256, 64, "torch.bfloat16", "torch.bfloat16")] = o.configs[1]
    c.cache[(1, 6, 64, "torch.float32", "torch.float32")] = c.configs[2]
    line = fla_configs.capture(tmp_path, [o, c], H100, versions)
    assert line == (f"ebb: fla kernel configs: captured 2 kernels (3 keys) into {tmp_path / 'NVIDIA_H100_80GB_HBM3'}, "
                    f"now 2 kernels for {H100}, fla {versions['fla']} / Triton {versions['triton']}")
    return tmp_path, [o, c]


def test_a_captured_set_round_trips_through_flas_file_format(tmp_path):
    root, tuners = tuned(tmp_path)
    directory = root / "NVIDIA_H100_80GB_HBM3"
    assert sorted(p.name for p in directory.iterdir()) == ["chunk_fwd_kernel_o.json", "chunk_local_cumsum_scalar_kernel.json"]
    data = json.loads((directory / "chunk_fwd_kernel_o.json").read_text())
    assert (data["kernel_name"], data["gpu"], data["fla_version"], data["triton_version"], data["default_config"]) == (
        "chunk_fwd_kernel_o", H100, "0.6.0", "3.6.0", None)
    key = [6, 256, 512, 64, "torch.bfloat16", "torch.bfloat16"]
    name = hashlib.md5(json.dumps(key, separators=(",", ":"), sort_keys=True).encode()).hexdigest()  # fla's entry name
    assert data["autotune_entries"][name] == {
        "autotune_key": key, "module": "fla.ops.common.chunk_o",
        "config": {"kwargs": {"BV": 64}, "num_warps": 4, "num_stages": 3, "num_ctas": 1, "maxnreg": None, "ir_override": None},
    }
    kernel_set = fla_configs.read_set(directory)
    assert (kernel_set.gpu, kernel_set.versions) == (H100, {"fla": "0.6.0", "triton": "3.6.0"})
    loaded = {(name, e.key): e.config for name, entries in kernel_set.kernels.items() for e in entries}
    recorded = {(fla_configs.kernel_of(t)[1], key): fla_configs.config_dict(c) for t in tuners for key, c in t.cache.items()}
    assert loaded == recorded


def test_a_launch_takes_the_sets_config_for_its_key_and_tokens_or_sequences_may_differ(tmp_path, monkeypatch):
    root, (o, c) = tuned(tmp_path)
    kernel_set = fla_configs.read_set(root / "NVIDIA_H100_80GB_HBM3")
    monkeypatch.setattr(fla_configs, "usage", fla_configs.Usage())
    fresh_o, fresh_c = chunk_o(), cumsum()
    fla_configs.seed_from(kernel_set, fresh_o)
    fla_configs.seed_from(kernel_set, fresh_c)
    q, s = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    for T in (2048, 8192):  # T is no key argument: the same key
        assert launch(fresh_o, q=q, o=q, T=T, H=6, K=256, V=512, BT=64) is fresh_o.configs[4]
    assert launch(fresh_o, q=q, o=q, T=8192, H=6, K=128, V=256, BT=64) is fresh_o.configs[1]
    assert launch(fresh_c, s=s, o=s, T=2048, B=8, H=6, BT=64) is fresh_c.configs[2]  # 8 sequences, captured at 1
    assert fresh_o.cache == o.cache and fresh_c.cache == {(8, 6, 64, "torch.float32", "torch.float32"): c.configs[2]}
    assert not fresh_o.benchmarked and not fresh_c.benchmarked and len(fla_configs.usage.served) == 3

    for values in (dict(H=6, K=64, V=128, BT=64), dict(H=4, K=256, V=512, BT=64), dict(H=6, K=256, V=512, BT=32)):  # a head dim, a head count, a tile
        launch(fresh_o, q=q, o=q, T=2048, **values)
    launch(fresh_o, q=s, o=s, T=2048, H=6, K=256, V=512, BT=64)  # float32 tensors
    assert len(fresh_o.benchmarked) == 4 and len(fla_configs.usage.served) == 3  # each left to Triton's autotuning


def test_a_config_the_kernel_no_longer_offers_or_prunes_is_never_launched(tmp_path):
    root, _ = tuned(tmp_path)
    kernel_set = fla_configs.read_set(root / "NVIDIA_H100_80GB_HBM3")
    q = torch.zeros(1, dtype=torch.bfloat16)
    values = dict(q=q, o=q, T=2048, H=6, K=256, V=512, BT=64)
    other_candidates = chunk_o()
    other_candidates.configs = [Config({"BV": 128}, num_warps=w) for w in (4, 8)]
    pruning = chunk_o()
    pruning.early_config_prune = lambda configs, named, **kwargs: [c for c in configs if c.kwargs["BV"] <= named["K"] // 8]
    other_module = chunk_o()
    other_module.base_fn = kernel("fla.ops.gated_delta_product.chunk_deltaproduct_o", "chunk_fwd_kernel_o")  # fla has two of that name
    for tuner in (other_candidates, pruning, other_module):
        fla_configs.seed_from(kernel_set, tuner)
        launch(tuner, **values)
        assert tuner.benchmarked == [(6, 256, 512, 64, "torch.bfloat16", "torch.bfloat16")]


def test_the_header_says_which_set_applies(tmp_path, monkeypatch):
    monkeypatch.delenv("EBB_FLA_CONFIGS", raising=False)
    root, _ = tuned(tmp_path)
    kernel_set, line = fla_configs.plan(H100, VERSIONS, str(root))
    assert line == "ebb: fla kernel configs: NVIDIA H100 80GB HBM3, 2 kernels, fla 0.6.0 / Triton 3.6.0"
    assert sorted(kernel_set.kernels) == ["chunk_fwd_kernel_o", "chunk_local_cumsum_scalar_kernel"]

    kernel_set, line = fla_configs.plan("NVIDIA H200", VERSIONS, str(root))
    assert kernel_set is None and line == (
        f"ebb: fla kernel configs: none in {root} for NVIDIA H200 (fla 0.6.0 / Triton 3.6.0); Triton autotunes fla's kernels in the "
        "first steps (minutes on a fresh machine); EBB_FLA_CONFIGS_CAPTURE=DIR captures a set after the first step (README: GPU fast path)")
    monkeypatch.setattr(fla_configs, "SHIPPED", tmp_path / "empty")
    assert fla_configs.plan("NVIDIA H200", VERSIONS)[1].startswith("ebb: fla kernel configs: none shipped for NVIDIA H200 (fla 0.6.0 / Triton 3.6.0); ")


def test_EBB_FLA_CONFIGS_off_is_honoured(tmp_path, monkeypatch):
    root, _ = tuned(tmp_path)
    monkeypatch.setattr(fla_configs, "SHIPPED", root)  # as if this set shipped
    monkeypatch.delenv("EBB_FLA_CONFIGS", raising=False)
    assert fla_configs.plan(H100, VERSIONS)[0] is not None
    monkeypatch.setenv("EBB_FLA_CONFIGS", "off")
    assert fla_configs.plan(H100, VERSIONS) == (
        None, "ebb: fla kernel configs: off (EBB_FLA_CONFIGS=off); Triton autotunes fla's kernels in the first steps (minutes on a fresh machine)")


@pytest.mark.parametrize("here", [dict(VERSIONS, fla="0.5.0"), dict(VERSIONS, triton="3.7.0"), dict(VERSIONS, fla=None)])
def test_a_set_captured_with_other_versions_is_refused_with_a_warning(tmp_path, here):
    root, _ = tuned(tmp_path)
    kernel_set, line = fla_configs.plan(H100, here, str(root))
    assert kernel_set is None
    assert line == (
        f"ebb: warning: fla kernel configs for {H100} in {root / 'NVIDIA_H100_80GB_HBM3'} were captured with fla 0.6.0 / Triton 3.6.0, "
        f"not fla {here['fla']} / Triton {here['triton']} as here: not used; Triton autotunes fla's kernels in the first steps (minutes on a "
        "fresh machine); EBB_FLA_CONFIGS_CAPTURE=DIR captures a set after the first step (README: GPU fast path)")


def test_unreadable_or_mixed_sets_are_refused_with_a_warning(tmp_path):
    root, _ = tuned(tmp_path)
    directory = root / "NVIDIA_H100_80GB_HBM3"
    path = directory / "chunk_fwd_kernel_o.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | {"fla_version": "0.5.0"}))
    assert fla_configs.plan(H100, VERSIONS, str(root))[1] == (
        f"ebb: warning: fla kernel configs in {directory} not used: its files were captured with different fla versions (0.5.0, 0.6.0); "
        "Triton autotunes fla's kernels in the first steps (minutes on a fresh machine)")
    path.write_text("{not json")
    kernel_set, line = fla_configs.plan(H100, VERSIONS, str(root))
    assert kernel_set is None and line.startswith(f"ebb: warning: fla kernel configs in {directory} not used: chunk_fwd_kernel_o.json: not a kernel config file (")
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "fla_version"}))  # fla's own files record Triton's version only
    assert "chunk_fwd_kernel_o.json does not record the fla and Triton versions it was captured with" in fla_configs.plan(H100, VERSIONS, str(root))[1]


def test_capturing_again_merges_a_set_of_the_same_versions_and_replaces_one_of_others(tmp_path):
    root, _ = tuned(tmp_path)
    o = chunk_o()
    o.cache[(6, 64, 128, 64, "torch.bfloat16", "torch.bfloat16")] = o.configs[0]
    fla_configs.capture(root, [o], H100, VERSIONS)
    kernel_set = fla_configs.read_set(root / "NVIDIA_H100_80GB_HBM3")
    assert len(kernel_set.kernels["chunk_fwd_kernel_o"]) == 3 and "chunk_local_cumsum_scalar_kernel" in kernel_set.kernels
    line = fla_configs.capture(root, [o], H100, dict(VERSIONS, triton="3.7.0"))
    assert line.endswith("now 1 kernels for NVIDIA H100 80GB HBM3, fla 0.6.0 / Triton 3.7.0, replacing a set of fla 0.6.0 / Triton 3.6.0")
    kernel_set = fla_configs.read_set(root / "NVIDIA_H100_80GB_HBM3")
    assert list(kernel_set.kernels) == ["chunk_fwd_kernel_o"] and len(kernel_set.kernels["chunk_fwd_kernel_o"]) == 1


def test_the_listing_says_what_each_set_holds_and_whether_it_applies(tmp_path, capsys):
    from launch import fla_configs as listing

    root, _ = tuned(tmp_path)
    directory = root / "NVIDIA_H100_80GB_HBM3"
    assert listing.describe(directory, VERSIONS, H100) == (
        "NVIDIA H100 80GB HBM3: 2 kernels, 3 keys, fla 0.6.0 / Triton 3.6.0 (matches the versions here, this GPU)\n"
        "  chunk_fwd_kernel_o, chunk_local_cumsum_scalar_kernel")
    assert listing.describe(directory, dict(VERSIONS, triton="3.7.0"), "NVIDIA H200").startswith(
        "NVIDIA H100 80GB HBM3: 2 kernels, 3 keys, fla 0.6.0 / Triton 3.6.0 (not with Triton 3.7.0 as here, not this GPU (NVIDIA H200))")
    assert listing.main([str(tmp_path / "none")]) == 0 and capsys.readouterr().out == f"no kernel-config sets in {tmp_path / 'none'}\n"


# --- fla's own autotuners: under Triton's interpreter, and on a GPU ------------------------

H, K, V = 2, 32, 64


def gated_deltanet_step(batch: int, T: int) -> list[torch.Tensor]:
    """fla's chunk_gated_delta_rule as ebb calls it (dispatch.run_fla: state V-first) and ebb's
    RMSNorm on fla's fused kernel (a plain `triton.autotune`, which fla's own loader never reads),
    forward and backward, on `batch` sequences of T tokens: the output and every input's gradient."""
    gen = torch.Generator().manual_seed(T)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    inputs = {"q": F.normalize(randn(batch, T, H, K), dim=-1), "k": F.normalize(randn(batch, T, H, K), dim=-1), "v": randn(batch, T, H, V),
              "g": -F.softplus(randn(batch, T, H)), "beta": torch.sigmoid(randn(batch, T, H))}
    leaves = {n: x.requires_grad_() for n, x in inputs.items()}
    out = RMSNorm(V)(dispatch.run_fla("chunk_gated_delta_rule", dict(leaves))[0])
    return [out.detach(), *torch.autograd.grad((out * torch.cos(out)).sum(), list(leaves.values()))]


def norm_and_decay_step(batch: int, T: int) -> list[torch.Tensor]:
    """On the GPU, kernels quick to autotune: ebb's RMSNorm on fla's fused kernel (a plain
    `triton.autotune`) and fla's chunked cumulative sum of log-decays (fla's cached autotuner),
    forward and backward."""
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(batch, T, 256, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    g = (-F.softplus(torch.randn(batch, T, 4, generator=gen))).cuda()
    from fla.ops.utils.cumsum import chunk_local_cumsum

    y = RMSNorm(256).cuda()(x)
    return [chunk_local_cumsum(g, chunk_size=64), y.detach(), *torch.autograd.grad((y.float() * torch.cos(y.float())).sum(), [x])]


def replayed_from_a_set(tmp_path: Path, monkeypatch, step) -> tuple[dict, set]:
    """`step(1, 64)` with every autotuner of fla's emptied (it autotunes); what they chose is
    captured, and fla's own reader reads the files so. Then, their caches emptied again and the set
    applied, `step(1, 64)` launches exactly those configs (the same outputs) and `step(2, 96)`
    configs of the set, and benchmarking fails the test. The choices, and what the set served."""
    import triton.runtime.autotuner as autotuner
    from fla.ops.utils.cache import AutotuneKey, KernelConfigFile

    tuners = fla_configs.autotuners()
    for tuner in tuners:
        monkeypatch.setattr(tuner, "cache", {})
    first = step(1, 64)
    chosen = {fla_configs.kernel_of(t): dict(t.cache) for t in tuners if t.cache}
    assert {type(t).__name__ for t in tuners if t.cache} == {"Autotuner", "CachedAutotuner"}  # fla's own loader would miss the first kind

    fla_configs.capture(tmp_path, tuners, H100, fla_configs.installed_versions())
    directory = tmp_path / "NVIDIA_H100_80GB_HBM3"
    kernel_set = fla_configs.read_set(directory)
    for (module, name), cache in chosen.items():
        flas_reading = KernelConfigFile.from_file(directory / f"{name}.json")
        for key, config in cache.items():
            assert fla_configs.Entry(key, fla_configs.config_dict(config), module) in kernel_set.kernels[name]
            assert flas_reading.lookup_exact(AutotuneKey(key))["config"] == fla_configs.config_dict(config)

    def benchmark(self, *args, config, **meta):
        raise AssertionError(f"{self.base_fn.__name__} was benchmarked")

    monkeypatch.setattr(autotuner.Autotuner, "_bench", benchmark)
    monkeypatch.setattr(fla_configs, "usage", fla_configs.Usage())
    for tuner in tuners:
        tuner.cache = {}
    fla_configs.activate(kernel_set)
    assert {fla_configs.kernel_of(t) for t in fla_configs._seeding} >= set(chosen)
    try:
        again = step(1, 64)
        assert {fla_configs.kernel_of(t): t.cache for t in tuners if t.cache} == chosen
        assert all(torch.equal(a, b) for a, b in zip(again, first))
        step(2, 96)
    finally:
        fla_configs.activate(None)
    served = fla_configs.usage.served
    assert {name for name, _ in served} == {name for _, name in chosen}
    return chosen, served


@needs_interpreter
def test_fla_kernels_launch_the_captured_configs_without_benchmarking(tmp_path, monkeypatch):
    """Under the interpreter, every autotuner of fla gets its whole candidate list back and a stand-in
    for timing (the interpreter has none) under which its last pruned candidate is fastest; a step
    of a Gated DeltaNet layer autotunes so, then replays from the captured set."""
    import fla  # noqa: F401  (its layers import the kernels' modules, which build the autotuners)
    import triton.runtime.autotuner as autotuner

    monkeypatch.setattr(fla_modules, "fla_layers_for", lambda x: True)  # on CPU tensors
    for tuner in fla_configs.autotuners():
        monkeypatch.setattr(tuner, "configs", tuner.all_configs)
    monkeypatch.setattr(autotuner.Autotuner, "_bench", lambda self, *args, config, **meta: [-float(self.configs.index(config))] * 3)
    chosen, served = replayed_from_a_set(tmp_path, monkeypatch, gated_deltanet_step)
    assert any(config is not t.configs[0] for t in fla_configs.autotuners() for config in chosen.get(fla_configs.kernel_of(t), {}).values())
    assert ("chunk_local_cumsum_scalar_kernel", (2, H, 64, False, False, "torch.float32", "torch.float32")) in served  # B alone differs


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or optional_attribute("fla", "__version__") is None, reason="needs CUDA and fla")
def test_on_the_gpu_fla_kernels_launch_the_captured_configs_without_benchmarking(tmp_path, monkeypatch):
    """The same on a GPU, with Triton's real autotuning and compiled kernels."""
    _, served = replayed_from_a_set(tmp_path, monkeypatch, norm_and_decay_step)
    assert any(name == "chunk_local_cumsum_scalar_kernel" and key[0] == 2 for name, key in served)  # B alone differs

