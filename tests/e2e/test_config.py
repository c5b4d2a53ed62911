"""Run-config validation: typed sections, overrides, and one-line errors naming the key."""
from pathlib import Path

import pytest

from checkpoint import MODES
from optim.codecs import CODECS
from optim.schedules import LR_SCHEDULES
from parallel.data_parallel import ACTIVATION_CHECKPOINTING
from parallel.pipeline import PIPELINE_SCHEDULES
from pretrain.config import ConfigError, RunConfig, build_config, dump_config, load_config

REPO = Path(__file__).resolve().parents[2]
# keys whose value is a name from a registry: (key, registry, what the error calls a name)
REGISTRY_KEYS = [
    ("optim.state_dtype", CODECS, "state dtype"),
    ("optim.schedule", LR_SCHEDULES, "lr schedule"),
    ("checkpoint.mode", MODES, "checkpoint mode"),
    ("parallel.pp_schedule", PIPELINE_SCHEDULES, "pipeline schedule"),
    ("train.activation_checkpoint", ACTIVATION_CHECKPOINTING, "activation checkpointing mode"),
]


def test_every_shipped_config_validates():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert isinstance(load_config(path), RunConfig)


def test_documented_keys_exist_and_override():
    cfg = build_config(
        {},
        [
            "model.pattern=MM*", "model.d_model=128", "model.vocab_size=300", "train.steps=7",
            "train.seq_len=64", "train.batch_size=3", "train.run_dir=/tmp/x", "train.seed=5",
            "optim.lr=1e-3", "checkpoint.interval=2", "checkpoint.mode=sync", "checkpoint.keep_last=4",
        ],
    )
    assert (cfg.model.pattern, cfg.model.d_model, cfg.model.vocab_size) == ("MM*", 128, 300)
    assert (cfg.train.steps, cfg.train.seq_len, cfg.train.batch_size, cfg.train.seed) == (7, 64, 3, 5)
    assert cfg.train.run_dir == "/tmp/x" and cfg.optim.lr == pytest.approx(1e-3)
    assert (cfg.checkpoint.interval, cfg.checkpoint.mode, cfg.checkpoint.keep_last) == (2, "sync", 4)


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  pattern: 'GG'\ntrain:\n  steps: 10\n")
    cfg = load_config(path, ["train.steps=20", "model.mixers.gated_deltanet.allow_neg_eigval=true"])
    assert cfg.model.pattern == "GG" and cfg.train.steps == 20
    assert cfg.model.mixers.gated_deltanet.allow_neg_eigval is True


def test_pattern_ignores_spaces_and_stage_cuts():
    cfg = build_config({"model": {"pattern": "GG* | GG*"}})
    assert cfg.model.blocks == "GG*GG*" and cfg.model.n_layers == 6


def test_a_value_that_is_not_yaml_is_taken_as_text():
    """`*` alone is a YAML alias: as an override it is the pattern of one attention block."""
    assert build_config({}, ["model.pattern=*"]).model.pattern == "*"
    assert build_config({}, ["model.pattern=*M"]).model.pattern == "*M"
    with pytest.raises(ConfigError, match=r"config key optim.betas: Input should be a valid tuple \(got '\[0.9,'\)"):
        build_config({}, ["optim.betas=[0.9,"])


def test_an_open_bound_may_be_infinite(tmp_path):
    cfg = build_config({}, ["model.pattern=M"])
    assert cfg.model.mixers.mamba2.dt_limit[1] == float("inf")
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_dump_round_trips(tmp_path):
    cfg = build_config({}, ["model.pattern=T*", "optim.schedule=wsd"])
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.patern=MM"], "unknown config key model.patern (did you mean model.pattern?)"),
        (["trian.steps=3"], "unknown config key trian (did you mean train?)"),
        (["model.mixers.mamba2.dstate=8"], "did you mean model.mixers.mamba2.d_state?"),
        (["optim.overrides=[{params: '*', stat_dtype: fp32}]"], "unknown config key optim.overrides.0.stat_dtype (did you mean optim.overrides.0.state_dtype?)"),
        (["data.sources=[{pth: x}]"], "did you mean data.sources.0.path?"),
        (["model.pattern=MX"], "unknown mixer character 'X'"),
        (["model.pattern=  |"], "pattern has no blocks"),
        (["model.pattern=R", "model.d_model=80"], "must be divisible by mixers.rwkv7.head_dim"),
        (["train.steps=abc"], "config key train.steps"),
        (["optim.lr=-1"], "config key optim.lr"),
        (["optim.lr=.inf"], "config key optim.lr: Input should be a finite number (got inf)"),
        (["optim.betas=[.nan, 0.95]"], "config key optim.betas.0: Input should be a finite number"),
        (["train.grad_clip=.inf"], "config key train.grad_clip: Input should be a finite number"),
        (["checkpoint.mode=fast"], "config key checkpoint.mode"),
        (["model.d_model=100", "model.mixers.attention.num_heads=3"], "must be divisible by mixers.attention.num_heads"),
        (["model.pattern=G", "model.mixers.gated_deltanet.num_v_heads=3", "model.mixers.gated_deltanet.num_heads=2"],
         "num_v_heads (3) must be a multiple of num_heads (2)"),
        (["model.pattern=M", "model.d_model=80", "model.mixers.mamba2.head_dim=64"], "must be divisible by mixers.mamba2.head_dim"),
        (["parallel.pp=2", "model.tie_embeddings=false", "train.grad_accum=2"], "train.grad_accum must be 1 with parallel.pp > 1"),
        (["parallel.pp=2", "model.tie_embeddings=false", "data.packing=varlen"], "data.packing=varlen makes one row per batch"),
        (["parallel.sequence_parallel=true"], "sequence_parallel needs tp > 1"),
        (["train=3"], "config key train"),
        (["novalue"], "is not of the form key.sub=value"),
    ],
)
def test_bad_configs_give_one_line_naming_the_cause(overrides, expected):
    with pytest.raises(ConfigError) as info:
        build_config({}, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize("key, registry, what", REGISTRY_KEYS)
def test_a_name_outside_its_registry_is_one_line_naming_the_key_and_the_choices(key, registry, what):
    with pytest.raises(ConfigError) as info:
        build_config({}, [f"{key}=nosuch"])
    assert str(info.value) == f"config key {key}: unknown {what} 'nosuch' (one of {', '.join(registry)})"


def test_an_override_state_dtype_is_checked_against_the_codecs():
    with pytest.raises(ConfigError) as info:
        build_config({}, ["optim.overrides=[{params: '*.w0', state_dtype: int4}]"])
    assert str(info.value) == f"config key optim.overrides.0.state_dtype: unknown state dtype 'int4' (one of {', '.join(CODECS)})"


@pytest.mark.parametrize("key, registry, what", REGISTRY_KEYS)
def test_a_name_is_valid_once_registered(monkeypatch, key, registry, what):
    monkeypatch.setitem(registry, "added", next(iter(registry.values())))
    section, field = key.split(".")
    assert getattr(getattr(build_config({}, [f"{key}=added"]), section), field) == "added"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)
