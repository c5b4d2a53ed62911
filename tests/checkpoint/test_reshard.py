"""A checkpoint saved under one layout resumes under another, for every codec in `CODECS`, every
checkpoint mode in `MODES` and every pair in `PAIRS` (real gloo processes, the production step,
checkpointer and data loader): a model whose tp 2 row splits cut blocks (attention's and Gated
DeltaNet's out_proj: 16 of 32 columns) beside one whose split keeps them whole (the MLP's
down_proj: 256 of 512 columns), every tensor quantised (`optim.min_quant_numel=0`: FSDP2 cuts the
1-D tensors' blocks), the offload pairs with bf16 parameters and master weights.

For each pair and codec:
- right after the load, every model and optimizer tensor, gathered to its global form, equals
  what the saving run held, bit for bit (codes, scales, moments, step counts, master copies);
- the next two steps match those of one process that loaded the same checkpoint: losses and
  gradient norms within 1e-6 relative (both steps see the loaded state, the second after one
  fp32 update, so for every codec), every tensor after each step within 1e-6 of its norm, but
  a low-bit codec's moments, within one rounding of the codec per encoding (the largest gap
  between the values their block can hold, decoded from every code; bf16's last place), carried
  over by the betas; after the second step the parameters a moment encoded differently after
  the first moved by another step are left out. With bf16 parameters the two layouts round bf16
  gradients differently: 2^-5 (four units in bf16's last place) instead of 1e-6;
- rank 0 says `ebb: resharding step-... from <saved layout> to <this one>`, once per load.

The data stream follows the dp size: a run at dp 1 resumed at dp 2, then at dp 1 again, consumed
exactly the token rows an uninterrupted run would have (the same rows in the same order, the same
count of every token id, no row twice).

Spawns are shared: the one-process saves, then one 4-process spawn (saves and loads of 4-rank
layouts), one 2-process spawn (saves and loads of 2-rank layouts), then the one-process loads and
references. A codec, a checkpoint mode or a pair added later is covered as it is."""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from checkpoint import MODES, build_checkpointer, dcp
from checkpoint.manager import layout_change
from models.model import HybridLM
from optim.adamw import build_optimizer
from optim.codecs import CODECS, StateCodec
from optim.codecs.base import Parts
from optim.config import OptimConfig
from optim.offload import OffloadAdamW
from optim.schedules import build_lr_schedule
from pretrain.config import RunConfig, load_config
from pretrain.data import build_data
from pretrain.parallelize import parallelize, start
from pretrain.runtime import set_up
from pretrain.step import train_step
from pretrain.train import checkpoint_layout
from tests.conftest import TP2_MIXERS, tiny_model_overrides
from tests.distributed import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

GLOBAL_BATCH, SAVE_AT, MORE = 4, 2, 2
TOTAL = SAVE_AT + 2 * MORE  # the longest chain of runs: a fresh save, a resumed run, a resumed run of that
FP32_TOL, BF16_TOL = 1e-6, 2.0**-5
OPTIM = OptimConfig()  # the runs' betas are the defaults
MODEL = tiny_model_overrides("G*", vocab_size=320, mlp_hidden=512, tie_embeddings=False, mixers=TP2_MIXERS)
OFFLOAD = ["optim.offload.enabled=true", "optim.offload.subgroup_size=4000", "optim.offload.gpu_every_k=2", "optim.offload.host_optimizer=torch"]


@dataclass(frozen=True)
class Layout:
    sizes: tuple[tuple[str, int], ...] = ()  # parallel.<dim>=<size>; the rest 1
    offload: bool = False

    @property
    def world(self) -> int:
        return int(torch.tensor([size for _, size in self.sizes] or [1]).prod())

    @property
    def dp(self) -> int:
        return dict(self.sizes).get("dp_shard", 1) * dict(self.sizes).get("dp_replicate", 1)

    def overrides(self) -> list[str]:
        sizes = {"pp": 1, "tp": 1, "dp_replicate": 1, "dp_shard": 1} | dict(self.sizes)
        out = [f"parallel.{dim}={size}" for dim, size in sizes.items()] + [f"train.batch_size={GLOBAL_BATCH // self.dp}"]
        return out + (["parallel.pp_microbatches=2"] if sizes["pp"] > 1 else []) + (OFFLOAD if self.offload else [])


ONE = Layout()
TP2, DP2, PP2 = Layout((("tp", 2),)), Layout((("dp_shard", 2),)), Layout((("pp", 2),))
TP2_DP2, HSDP = Layout((("tp", 2), ("dp_shard", 2))), Layout((("dp_replicate", 2), ("dp_shard", 2)))
DP2_OFFLOAD = Layout((("dp_shard", 2),), offload=True)


@dataclass(frozen=True)
class Pair:
    saved: Layout
    loaded: Layout
    master: bool = False  # bf16 parameters with fp32 master weights
    after: int | None = None  # loads the checkpoint the resumed run of PAIRS[after] saved (else a fresh run's)


PAIRS = [
    Pair(ONE, TP2), Pair(TP2, ONE, after=0), Pair(ONE, DP2), Pair(DP2, TP2, after=2), Pair(TP2_DP2, PP2), Pair(PP2, ONE, after=4),
    Pair(ONE, DP2_OFFLOAD, master=True), Pair(DP2_OFFLOAD, ONE, master=True, after=6), Pair(TP2_DP2, HSDP),
]
DATA_CHAIN = 3  # its chain of runs, dp 1 -> 2 -> 1 (tp 2), covers the data stream's three legs


@dataclass
class Job:
    """One run on this rank: a fresh one trains from seed 0 for `SAVE_AT` steps and saves (a
    one-process one then trains on, unbroken, as the reference of the loads of its checkpoint);
    a resumed one loads `load` (saved under `source` after `first` steps) into another seed's
    model, trains `MORE` steps and saves."""

    layout: Layout
    codec: str
    master: bool
    mode: str
    save: Path
    load: Path | None = None
    first: int = 0
    source: Layout | None = None

    @property
    def unbroken(self) -> bool:
        return self.load is None and self.layout == ONE


@dataclass
class Outcome:
    loaded: dict[str, Any] = field(default_factory=dict)  # global state right after the load
    saved: dict[str, Any] = field(default_factory=dict)  # global state when saved
    first: dict[str, Any] = field(default_factory=dict)  # global state after the first step of the compared ones
    final: dict[str, Any] = field(default_factory=dict)  # and after the last
    losses: list[float] = field(default_factory=list)  # of the compared steps (a resumed run's, or an unbroken one's after its save)
    norms: list[float] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)  # this rank's input rows, per step


def config(job: Job, run_dir: Path) -> RunConfig:
    return load_config(None, [
        *MODEL, *job.layout.overrides(), f"optim.state_dtype={job.codec}", f"optim.master_weights={str(job.master).lower()}",
        f"checkpoint.mode={job.mode}", f"train.run_dir={run_dir}", f"train.steps={TOTAL}", "train.seq_len=16", "train.threads=1",
        "train.dtype=float32", "train.device=cpu", "train.grad_clip=0.5", "optim.lr=3e-3", "optim.warmup_steps=1", "optim.fused=false",
        "optim.min_quant_numel=0", "optim.compile=false", "data.embedded_max_bytes=30000", "data.prefetch=2",
    ])


def global_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every model and optimizer entry this rank holds, tensors in their global form."""
    state = dcp.capture_state(module, optimizer)
    flat = {f"model.{k}": v for k, v in state["model"].items()} | {f"optimizer.{k}": v for k, v in state["optimizer"].items()}
    full = lambda v: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()  # noqa: E731
    return {k: full(v) if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in flat.items()}


class Recorded:
    """The loader's batches, each one's input rows kept."""

    def __init__(self, batches: Any, rows: list[torch.Tensor]):
        self.batches, self.rows = batches, rows

    def __next__(self) -> Any:
        batch = next(self.batches)
        self.rows.append(batch.input_ids.clone())
        return batch


def run_job(job: Job, root: Path) -> Outcome:
    cfg = config(job, root / "runs")
    runtime = set_up(cfg.train)
    par = start(cfg, runtime)
    torch.manual_seed(0 if job.load is None else 1)
    model = HybridLM(cfg.model)
    if job.master:
        model = model.to(torch.bfloat16)
    parallelize(par, model, cfg, runtime)
    optimizer = build_optimizer(par.module, cfg.optim)
    if isinstance(optimizer, OffloadAdamW):
        optimizer.backwards_per_step = par.microbatches if par.pipeline is not None else cfg.train.grad_accum
    schedule = build_lr_schedule(optimizer, TOTAL, **cfg.optim.schedule_options)
    _, batches, _ = build_data(cfg.data, cfg.train, cfg.model.vocab_size, par.dp_rank, par.dp_size)
    out = Outcome()
    layout = checkpoint_layout(par, cfg)
    if job.load is not None:
        assert build_checkpointer(job.load, cfg.checkpoint, layout=layout).resume(par.module, optimizer, schedule, batches) == job.first
        out.loaded = global_state(par.module, optimizer)
    recorded = Recorded(batches, out.rows)

    def train(steps: int) -> None:
        for step in range(steps):
            result = train_step(par, optimizer, recorded, cfg.train.grad_accum, cfg.train.grad_clip, runtime)
            schedule.step()
            out.losses.append(result.loss.item())
            out.norms.append(result.grad_norm.item())
            if step == 0:
                out.first = global_state(par.module, optimizer)

    train(SAVE_AT if job.load is None else MORE)
    out.saved = out.final = global_state(par.module, optimizer)
    saver = build_checkpointer(job.save, cfg.checkpoint, layout=layout)
    saver.save(job.first + len(out.rows), par.module, optimizer, schedule, batches, final=True)
    saver.finalize()
    if job.unbroken:
        out.losses, out.norms = [], []
        train(MORE)
        out.final = global_state(par.module, optimizer)
    batches.close()
    return out


def run_jobs(jobs: list[Job], root: Path) -> list[Outcome]:
    return [run_job(job, root) for job in jobs]


def name(layout: Layout) -> str:
    return "x".join(f"{dim}{size}" for dim, size in layout.sizes) + ("-offload" if layout.offload else "") or "one"


def merged(outcomes: list[Outcome], what: str) -> dict[str, Any]:
    """The ranks' global states together (pipeline stages hold different entries)."""
    out: dict[str, Any] = {}
    for outcome in outcomes:
        out |= getattr(outcome, what)
    return out


def dp_rows(outcomes: list[Outcome], layout: Layout) -> list[torch.Tensor]:
    """Each step's global batch rows: the data-parallel ranks' rows in dp order (the first rank
    of each dp coordinate: the ranks are ordered pp, dp_replicate, dp_shard, tp)."""
    sizes = {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1} | dict(layout.sizes)
    firsts = [outcomes[r * sizes["tp"]] for r in range(layout.dp)]  # pp = 1 when dp > 1 in PAIRS; pp ranks read the same rows
    return [torch.cat([o.rows[step] for o in firsts]) for step in range(len(firsts[0].rows))]


def assert_same_state(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    assert got.keys() == want.keys(), (what, got.keys() ^ want.keys())
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), (what, key)
        else:
            assert got[key] == value, (what, key)


def steps(codec: StateCodec, parts: Parts, signed: bool) -> torch.Tensor:
    """Per element: one step of the codec there, the largest gap between neighbouring values its
    block can hold (every code decoded under the block's scales), or for an elementwise codec
    one unit in the last place of its dtype."""
    codes = parts[codec.suffixes[0]]
    if codec.block is None:
        return codec.decode(parts, signed).abs() * torch.finfo(codes.dtype).eps
    last = codes.shape[-1] if codes.ndim else 1
    rows, blocks, repeat = codes.numel() // last, -(-last // codec.block), 256 // codec.block
    every = {codec.suffixes[0]: torch.arange(256, dtype=torch.uint8).repeat(rows, blocks)}
    every |= {s: parts[s].reshape(rows, blocks).repeat_interleave(repeat, dim=-1) for s in codec.block_parts}
    values = codec.decode(every, signed).view(rows, blocks, 256)
    gaps = torch.where(values.isfinite(), values, torch.nan).sort(-1).values.diff(dim=-1).nan_to_num(0.0).amax(-1)
    return gaps.repeat_interleave(codec.block, dim=-1)[:, :last].reshape(codes.shape)


def moments(state: dict[str, Any], codec: StateCodec) -> dict[str, tuple[Parts, bool]]:
    """Each stored moment's parts, by '<parameter>.<moment>', and whether it is signed."""
    found = {}
    for key in state:
        for moment, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            if key.startswith("optimizer.state.") and key.endswith(f".{moment}{codec.suffixes[0]}"):
                base = key.removesuffix(codec.suffixes[0])
                found[base.removeprefix("optimizer.state.")] = ({s: state[base + s] for s in codec.suffixes}, signed)
    return found


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    return bool((got.double() - want.double()).norm() <= tol * want.double().norm())


def assert_continues_as(got: Outcome, want: Outcome, codec: StateCodec, betas: tuple[float, float], tol: float, what: str) -> None:
    """Losses and gradient norms within `tol`; after each step, every tensor within `tol` of its
    norm, but a low-bit codec's moments: each encoding adds at most one rounding of the codec
    (`steps`) to what the moment held before, which the next step scales by its beta (plus `tol`
    of its largest value: the difference before rounding). After the second step the parameters
    a moment encoded differently after the first moved by another step are left out."""
    assert got.losses == pytest.approx(want.losses, rel=tol) and got.norms == pytest.approx(want.norms, rel=tol), what
    moved: dict[str, torch.Tensor] = {}
    before: dict[str, torch.Tensor] = {}  # each moment's difference after the first step
    for stage in ("first", "final"):
        g, w = getattr(got, stage), getattr(want, stage)
        assert g.keys() == w.keys(), (what, stage)
        coded = set()
        if codec.name != "fp32":
            for name, (parts, signed) in moments(w, codec).items():
                mine = {s: g[f"optimizer.state.{name}{s}"] for s in codec.suffixes}
                coded |= {f"optimizer.state.{name}{s}" for s in codec.suffixes}
                reference = codec.decode(parts, signed)
                error = (codec.decode(mine, signed) - reference).abs()
                carried = betas[0 if signed else 1] * before.get(name, torch.zeros(()))
                bound = carried + torch.maximum(steps(codec, parts, signed), steps(codec, mine, signed)) + tol * reference.abs().max()
                assert (error <= bound * (1 + 1e-6)).all(), (what, stage, name)
                before[name] = error
                if stage == "first":
                    param = name.rsplit(".", 1)[0]
                    moved[param] = moved.get(param, False) | (mine[codec.suffixes[0]] != parts[codec.suffixes[0]])
        for key, value in w.items():
            if key in coded:
                continue
            if not isinstance(value, torch.Tensor):
                assert g[key] == value, (what, stage, key)
                continue
            keep = ~moved.get(key.removeprefix("model."), torch.tensor(False)) if stage == "final" else torch.tensor(True)
            keep = keep.expand(value.shape)
            assert close(g[key][keep], value[keep], tol), (what, stage, key)


def mode_for(index: int) -> str:
    return list(MODES)[index % len(MODES)]


@dataclass
class Plan:
    """Every run of the test: fresh saves; per pair and codec a resumed run; the one-process
    references of the resumed runs that are not themselves one process, where no unbroken saver
    already is one."""

    saves: list[Job]
    loads: list[Job]  # PAIRS x codecs, in that order
    sources: list[Job]  # the run that saved each load's checkpoint
    references: list[Job]  # each load's reference, or the load itself (one process: nothing to compare)

    @staticmethod
    def of(pairs: list[Pair], codecs: list[str], root: Path) -> Plan:
        saves: dict[tuple, Job] = {}
        loads: list[Job] = []
        sources: list[Job] = []
        for i, pair in enumerate(pairs):
            for j, codec in enumerate(codecs):
                if pair.after is not None:
                    source = loads[pair.after * len(codecs) + j]
                else:
                    key = (pair.saved, codec, pair.master)
                    saves.setdefault(key, Job(pair.saved, codec, pair.master, mode_for(len(saves)), root / "saved" / f"{len(saves)}"))
                    source = saves[key]
                loads.append(Job(
                    pair.loaded, codec, pair.master, mode_for(i + j), root / "resumed" / f"{len(loads)}", source.save,
                    source.first + (SAVE_AT if source.load is None else MORE), source.layout,
                ))
                sources.append(source)
        references: dict[Path, Job] = {}
        for load, source in zip(loads, sources):
            if load.layout != ONE and not source.unbroken and source.save not in references:
                references[source.save] = Job(ONE, load.codec, load.master, "sync", root / "reference" / f"{len(references)}", source.save, load.first, source.layout)
        refs = [load if load.layout == ONE else source if source.unbroken else references[source.save] for load, source in zip(loads, sources)]
        return Plan(list(saves.values()), loads, sources, refs)

    def run(self, root: Path) -> dict[int, list[Outcome]]:
        """One process's fresh saves, then the 4-rank runs, then the 2-rank ones (some load what
        4 ranks saved, or what an earlier 2-rank run saved), then the one-process loads and
        references: one spawn per world size."""
        outcomes: dict[int, list[Outcome]] = {}
        everything = list({id(job): job for job in (*self.saves, *self.loads, *self.references)}.values())
        for world, jobs in ((1, self.saves), (4, everything), (2, everything), (1, everything)):
            mine = [job for job in jobs if job.layout.world == world and id(job) not in outcomes]
            if mine:
                results = [run_jobs(mine, root)] if world == 1 else run_distributed(run_jobs, world, mine, root)
                outcomes |= {id(job): [rank[i] for rank in results] for i, job in enumerate(mine)}
        return outcomes

    def reshard_lines(self) -> Counter[str]:
        """The `ebb: resharding` lines rank 0 of the loading runs prints."""
        lines: Counter[str] = Counter()
        for job in {id(job): job for job in (*self.loads, *self.references)}.values():
            if job.load is not None and (change := layout_change(checkpoint_layout_of(job.source), checkpoint_layout_of(job.layout))):
                lines[f"ebb: resharding step-{job.first:08d} {change}"] += 1
        return lines


def test_every_codec_resumes_exactly_under_every_layout_pair(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    codecs = list(CODECS)
    plan = Plan.of(PAIRS, codecs, tmp_path)
    outcomes = plan.run(tmp_path)
    said = Counter(line for line in capfd.readouterr().out.splitlines() if line.startswith("ebb: resharding"))
    assert said == plan.reshard_lines()

    pairs = [pair for pair in PAIRS for _ in codecs]
    for job, source, reference, pair in zip(plan.loads, plan.sources, plan.references, pairs):
        what = f"{name(pair.saved)} -> {name(pair.loaded)} {job.codec}{' master' if pair.master else ''}"
        got = outcomes[id(job)]
        assert_same_state(merged(got, "loaded"), merged(outcomes[id(source)], "saved"), what)
        if reference is not job:
            want = outcomes[id(reference)][0]
            resumed = Outcome(first=merged(got, "first"), final=merged(got, "final"), losses=got[0].losses, norms=got[0].norms)
            assert_continues_as(resumed, want, CODECS[job.codec], OPTIM.betas, BF16_TOL if pair.master else FP32_TOL, what)
            assert torch.equal(torch.cat(dp_rows(got, pair.loaded)), torch.cat(want.rows[-MORE:])), what  # the same global rows

    uninterrupted = uninterrupted_rows(tmp_path)
    for j in range(len(codecs)):
        chain, runs = [], DATA_CHAIN * len(codecs) + j
        while runs is not None:
            chain.insert(0, (plan.loads[runs], pairs[runs].loaded))
            after = pairs[runs].after
            runs = None if after is None else after * len(codecs) + j
        first = plan.sources[next(i for i, job in enumerate(plan.loads) if job is chain[0][0])]
        consumed = torch.cat([*outcomes[id(first)][0].rows[:SAVE_AT], *(row for job, layout in chain for row in dp_rows(outcomes[id(job)], layout))])
        assert [layout.dp for _, layout in chain] == [2, 1]  # dp 1 -> 2 -> 1
        assert torch.equal(consumed, uninterrupted[: len(consumed)]), codecs[j]
        assert torch.equal(torch.bincount(consumed.flatten(), minlength=320), torch.bincount(uninterrupted.flatten(), minlength=320))
        assert len({tuple(row.tolist()) for row in consumed}) == len(consumed)  # no row twice


def checkpoint_layout_of(layout: Layout) -> dict[str, Any]:
    sizes = {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1} | dict(layout.sizes)
    return {"world_size": layout.world, **sizes, "offload": layout.offload}


def uninterrupted_rows(root: Path) -> torch.Tensor:
    """The rows one process's loader gives over `TOTAL` steps."""
    cfg = config(Job(ONE, "fp32", False, "sync", root / "uninterrupted"), root / "uninterrupted")
    _, batches, _ = build_data(cfg.data, cfg.train, cfg.model.vocab_size)
    rows = torch.cat([next(batches).input_ids for _ in range(TOTAL)])
    batches.close()
    return rows
