"""Run configuration: one YAML file with sections model, data, train, optim, parallel,
checkpoint, logging, evaluation, validated by pydantic; `key.sub=value` overrides from the
command line.

Each package owns its section (models/config.py, pretrain/data/config.py, optim/config.py,
parallel/config.py, checkpoint/config.py, pretrain/evaluation/config.py), names chosen from a
registry validated against it; `train` and `logging` are here, with `RunConfig`, which composes
them and checks what spans sections. Every problem becomes a `ConfigError` whose message is one
line naming the key.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, Field, ValidationError, model_validator

from checkpoint import CheckpointConfig
from common.config import Strict, one_of
from models.config import ModelConfig
from optim.config import OptimConfig
from parallel.config import ActivationCheckpointing, ParallelConfig, check_context_pieces
from pretrain.data.config import DataConfig
from pretrain.evaluation.config import EvaluationConfig
from pretrain.linear_ce import LOSSES

LossName = Annotated[str, AfterValidator(one_of(LOSSES, "loss"))]


class ConfigError(ValueError):
    """A config that cannot run; the message is a single line naming the offending key."""


class TrainConfig(Strict):
    steps: int = Field(1000, gt=0)
    seq_len: int = Field(512, gt=0)
    batch_size: int = Field(8, gt=0, description="sequences per micro-batch")
    grad_accum: int = Field(1, gt=0)
    run_dir: str = "runs/default"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="autocast dtype; auto = bf16 where supported")
    grad_clip: float | None = Field(1.0, gt=0)
    eval_interval: int = Field(100, ge=0, description="0 disables evaluation")
    eval_batches: int = Field(8, gt=0)
    log_interval: int = Field(1, gt=0)
    threads: int | None = Field(None, gt=0, description="CPU threads for torch; None = torch default")
    stop_at_step: int | None = Field(
        None, gt=0, description="end this invocation after this step, as if preempted (the schedule still spans steps); continue with --resume"
    )
    activation_checkpoint: ActivationCheckpointing = Field(
        "none",
        description="recompute block activations in backward: full = every block, selective = every k-th (parallel.data_parallel.ACTIVATION_CHECKPOINTING)",
    )
    activation_checkpoint_every: int = Field(2, gt=0, description="selective activation checkpointing: every k-th block")
    loss: LossName = Field(
        "auto",
        description="cross-entropy: full logits, chunked (never all logits), fused (a CUDA kernel), auto (fused on CUDA where installed, else chunked)",
    )
    compile: bool = Field(False, description="torch.compile each block and the loss")
    on_nonfinite: Literal["stop", "skip_step"] = Field(
        "stop",
        description="a step whose loss or gradient norm is not finite: stop = end the run (exit 2) before its update, skip_step = drop its update",
    )
    max_skipped_steps: int = Field(10, gt=0, description="on_nonfinite=skip_step: stop after this many consecutive skipped steps")


class LoggingConfig(Strict):
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "ebb"
    wandb_mode: Literal["auto", "online", "offline"] = "auto"
    progress: bool = True


class RunConfig(Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _pipeline_fits_model_and_batch(self) -> "RunConfig":
        p, m = self.parallel, self.model
        if p.pp == 1:
            return self
        stages = p.pp * p.pp_virtual_stages
        if self.train.batch_size % p.microbatches:
            raise ValueError(f"parallel.pp_microbatches ({p.microbatches}) must divide train.batch_size ({self.train.batch_size})")
        if stages > m.n_layers:
            raise ValueError(f"pp * pp_virtual_stages ({stages}) pipeline stages need at least as many blocks (model has {m.n_layers})")
        cuts = m.pattern.count("|")
        if cuts and cuts + 1 != stages:
            raise ValueError(f"model.pattern has {cuts + 1} '|'-separated stages but pp * pp_virtual_stages is {stages}")
        return self

    @model_validator(mode="after")
    def _one_accumulation_under_pipeline(self) -> "RunConfig":
        """Under PP the schedule's microbatches are the gradient accumulation. (What depends on
        the world size is checked at startup by parallel.mesh.validate_layout.)"""
        if self.parallel.pp > 1 and self.train.grad_accum > 1:
            raise ValueError("train.grad_accum must be 1 with parallel.pp > 1: the pipeline accumulates over parallel.pp_microbatches")
        if self.parallel.pp > 1 and self.evaluation.tasks:
            raise ValueError(
                "evaluation.tasks is not supported with parallel.pp > 1 (the tasks need the whole model on one rank): "
                "score the run's checkpoints with python -m pretrain.evaluate instead"
            )
        if self.parallel.pp > 1 and self.data.packing == "varlen":
            raise ValueError("data.packing=varlen makes one row per batch, which the pipeline cannot split into microbatches: use rows with parallel.pp > 1")
        return self


    @model_validator(mode="after")
    def _context_pieces_fit(self) -> "RunConfig":
        """Under cp each row is cut into pieces (`parallel.config.check_context_pieces`): a row is
        train.seq_len tokens, or with varlen packing one row of batch_size * seq_len."""
        if self.parallel.cp == 1:
            return self
        if self.data.packing == "varlen":
            tokens, what = self.train.batch_size * self.train.seq_len, "train.batch_size * train.seq_len (one row with data.packing=varlen)"
        else:
            tokens, what = self.train.seq_len, "train.seq_len"
        check_context_pieces(self.model, self.parallel.cp, tokens, what)
        return self


def _section(annotation: Any) -> type[BaseModel] | None:
    """The config class a field holds: the annotation itself, or one inside a list or an Optional."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((found for arg in get_args(annotation) if (found := _section(arg)) is not None), None)


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at `loc` (the parent of a rejected key), for close-match suggestions."""
    for part in loc:
        if isinstance(part, int):  # an item of a list of sections
            continue
        model = _section(getattr(model.model_fields.get(str(part)), "annotation", None))
        if model is None:
            return []
    return list(model.model_fields)


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(RunConfig, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))}?)" if close else ""
        return f"unknown config key {key}{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if not key:
        return f"config: {msg}"
    if err["type"] == "value_error":
        return f"config key {key}: {msg}"
    return f"config key {key}: {msg} (got {err['input']!r})"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` strings -> (key, YAML-parsed value) pairs."""
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        pairs.append((key.strip(), parse_value(raw)))
    return pairs


def parse_value(raw: str) -> Any:
    """An override's value as YAML; text that is not YAML (`*`, which YAML reads as an alias, or
    `*M`) is taken as the string itself, which the key's type then checks."""
    if not raw.strip():
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def build_config(tree: dict[str, Any], overrides: list[str] = ()) -> RunConfig:
    tree = dict(tree or {})
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0])) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or the defaults when `path` is None) and apply overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    return build_config(tree, overrides)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
