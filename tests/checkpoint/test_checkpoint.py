import json
import random
import re

import pytest
import torch

from checkpoint import (
    QUARANTINE,
    CheckpointConfig,
    CheckpointDamaged,
    CheckpointError,
    CheckpointMismatch,
    Ranks,
    build_checkpointer,
    manifest,
    verify_together,
)
from checkpoint.manager import committed_checkpoints, find_latest, resolve_checkpoint
from checkpoint.storage import ALGORITHM, file_checksum
from optim.adamw import build_optimizer
from optim.config import OptimConfig
from tests.toy_state import make_state, train_steps

MODES = ["sync", "async", "lazy"]
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's async upload thread, one process


class Saver:
    """One checkpointer per call, finalized, as a run would use it."""

    def __init__(self, root, keep_last: int, files=None, mode: str = "sync"):
        self.root, self.files = root, files
        self.settings = CheckpointConfig(mode=mode, keep_last=keep_last)

    def save(self, step, *state):
        checkpointer = build_checkpointer(self.root, self.settings, self.files)
        checkpointer.save(step, *state)
        return checkpointer.finalize()

    def resume(self, *state) -> int:
        return build_checkpointer(self.root, self.settings).resume(*state)


@pytest.mark.parametrize("mode", MODES)
def test_resume_restores_model_optimizer_schedule_data_and_rng(tmp_path, mode):
    model, optimizer, schedule, data = make_state(0)
    train_steps(model, optimizer, schedule, 3)
    data.row = 7
    saved = Saver(tmp_path, keep_last=2, files={"config.yaml": "x: 1\n"}, mode=mode).save(3, model, optimizer, schedule, data)
    expected = train_steps(model, optimizer, schedule, 3) + [random.random()]

    model2, optimizer2, schedule2, data2 = make_state(1)
    assert Saver(tmp_path, keep_last=2).resume(model2, optimizer2, schedule2, data2) == 3
    assert data2.row == 7 and schedule2.last_epoch == 3
    assert train_steps(model2, optimizer2, schedule2, 3) + [random.random()] == expected
    assert (saved / "config.yaml").read_text() == "x: 1\n"


@pytest.mark.parametrize("mode", MODES)
def test_shards_are_checksummed_while_written_not_read_back(tmp_path, monkeypatch, mode):
    read_back = []
    monkeypatch.setattr(manifest, "file_checksum", lambda path: read_back.append(path.name) or file_checksum(path))
    model, optimizer, schedule, data = make_state(0)
    train_steps(model, optimizer, schedule, 1)
    saved = Saver(tmp_path, keep_last=1, files={"config.yaml": "x: 1\n"}, mode=mode).save(1, model, optimizer, schedule, data)
    entries = json.loads((saved / "manifest.json").read_text())["files"]
    assert {"__0_0.distcp", ".metadata", "trainer_state.pt", "config.yaml"} == entries.keys()
    assert sorted(read_back) == ["config.yaml", "trainer_state.pt"]  # the small files ebb writes itself
    assert all(entry[ALGORITHM] == file_checksum(saved / name) for name, entry in entries.items())
    assert torch.serialization.get_crc32_options()  # torch.save's zip CRC is back on after the write


def test_keep_last_and_latest_pointer(tmp_path):
    model, optimizer, schedule, data = make_state(0)
    manager = Saver(tmp_path, keep_last=2)
    for step in (1, 2, 3, 10):
        manager.save(step, model, optimizer, schedule, data)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step-00000003", "step-00000010"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000010"
    assert find_latest(tmp_path) == tmp_path / "step-00000010"
    assert resolve_checkpoint(tmp_path) == resolve_checkpoint(tmp_path / "step-00000010") == tmp_path / "step-00000010"


DAMAGE = {
    "flipped byte": lambda ckpt: flip_a_byte(ckpt / "__0_0.distcp"),
    "truncated shard": lambda ckpt: (ckpt / "__0_0.distcp").write_bytes((ckpt / "__0_0.distcp").read_bytes()[:100]),
    "missing shard": lambda ckpt: (ckpt / "__0_0.distcp").unlink(),
    "missing metadata": lambda ckpt: (ckpt / ".metadata").unlink(),
    "missing manifest": lambda ckpt: (ckpt / "manifest.json").unlink(),
    "unreadable manifest": lambda ckpt: (ckpt / "manifest.json").write_text("{"),
}
REASONS = {
    "flipped byte": r"__0_0\.distcp does not match its checksum",
    "truncated shard": r"__0_0\.distcp has 100 bytes, the manifest says \d+",
    "missing shard": r"__0_0\.distcp is missing",
    "missing metadata": r"\.metadata is missing",
    "missing manifest": r"step-00000005 has no manifest\.json",
    "unreadable manifest": r"manifest\.json is unreadable",
}


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def checkpoint_files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_moved_aside_whole_and_named_in_one_line(tmp_path, damage, capsys):
    model, optimizer, schedule, data = make_state(0)
    Saver(tmp_path, keep_last=2).save(4, model, optimizer, schedule, data)
    saved = Saver(tmp_path, keep_last=2).save(5, model, optimizer, schedule, data)
    DAMAGE[damage](saved)
    with pytest.raises(CheckpointDamaged, match=REASONS[damage]) as err:
        verify_together(Ranks(None), saved)
    assert "\n" not in str(err.value)
    damaged_files = checkpoint_files(saved)
    assert Saver(tmp_path, keep_last=2).resume(model, optimizer, schedule, data) == 4
    moved = tmp_path / QUARANTINE / "step-00000005"
    assert checkpoint_files(moved) == damaged_files  # kept byte for byte, not deleted
    warning = capsys.readouterr().err.splitlines()[0]
    assert warning.startswith("ebb: warning: checkpoint ") and re.search(REASONS[damage], warning) and warning.endswith(f"moved it to {moved}")
    assert [p.name for p in committed_checkpoints(tmp_path)] == ["step-00000004"]


def test_every_checkpoint_damaged_is_one_line_and_an_older_manifest_is_not_damage(tmp_path):
    model, optimizer, schedule, data = make_state(0)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Saver(tmp_path / "none", keep_last=1).resume(model, optimizer, schedule, data)
    saved = Saver(tmp_path, keep_last=1).save(5, model, optimizer, schedule, data)
    old = json.loads((saved / "manifest.json").read_text())
    (saved / "manifest.json").write_text(json.dumps(old | {"files": {k: {"size": v["size"], "crc32": 1} for k, v in old["files"].items()}}))
    with pytest.raises(CheckpointError, match=r"manifest\.json has no xxh3_64 checksum for .* \(written by an older ebb\)") as err:
        Saver(tmp_path, keep_last=1).resume(model, optimizer, schedule, data)
    assert not isinstance(err.value, CheckpointDamaged) and saved.is_dir()  # cannot be checked, which is not damage: left in place
    for shard in saved.glob("*.distcp"):
        shard.write_bytes(b"not a tensor file")
    (saved / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match=r"nothing to resume: every checkpoint in .* is damaged \(step-00000005/__0_0\.distcp has 17 bytes") as err:
        Saver(tmp_path, keep_last=1).resume(model, optimizer, schedule, data)
    assert "\n" not in str(err.value) and (tmp_path / QUARANTINE / "step-00000005").is_dir()


def test_a_second_damaged_checkpoint_of_a_step_is_kept_beside_the_first(tmp_path):
    model, optimizer, schedule, data = make_state(0)
    Saver(tmp_path, keep_last=3).save(1, model, optimizer, schedule, data)
    for attempt in range(2):
        saved = Saver(tmp_path, keep_last=3).save(2, model, optimizer, schedule, data)
        (saved / "manifest.json").unlink()
        assert Saver(tmp_path, keep_last=3).resume(model, optimizer, schedule, data) == 1
    assert sorted(p.name for p in (tmp_path / QUARANTINE).iterdir()) == ["step-00000002", "step-00000002.1"]


def test_an_intact_checkpoint_that_does_not_fit_is_a_mismatch_and_stays(tmp_path):
    model, optimizer, schedule, data = make_state(0)
    Saver(tmp_path, keep_last=1).save(3, model, optimizer, schedule, data)
    other = torch.nn.Sequential(torch.nn.Linear(8, 16))
    with pytest.raises(CheckpointMismatch, match=r"step-00000003 is intact but does not fit this run's model and optimizer") as err:
        Saver(tmp_path, keep_last=1).resume(other, build_optimizer(other, OptimConfig()), schedule, data)
    assert err.value.path == tmp_path / "step-00000003" and "\n" not in str(err.value)
    assert [p.name for p in committed_checkpoints(tmp_path)] == ["step-00000003"] and not (tmp_path / QUARANTINE).exists()


def test_a_crashed_save_leaves_nothing_that_resume_would_pick(tmp_path):
    model, optimizer, schedule, data = make_state(0)
    manager = Saver(tmp_path, keep_last=3)
    manager.save(1, model, optimizer, schedule, data)
    for leftover in (".tmp-step-00000002", ".tmp-step-00000005"):  # saves that died before their commit
        (tmp_path / leftover).mkdir()
    assert find_latest(tmp_path) == tmp_path / "step-00000001"
    manager.save(2, model, optimizer, schedule, data)  # the leftovers are removed
    assert find_latest(tmp_path) == tmp_path / "step-00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001", "step-00000002"]


LAYOUT = {"world_size": 8, "pp": 1, "dp_replicate": 1, "dp_shard": 4, "tp": 2, "offload": False}


def test_a_resume_under_another_layout_says_so_once(tmp_path, capsys):
    """The manifest records the layout a checkpoint was saved under; a resume under another one
    prints one line on rank 0 before loading; the same layout, or one not known, prints none."""
    model, optimizer, schedule, data = make_state(0)
    saver = build_checkpointer(tmp_path, CheckpointConfig(mode="sync"), layout=LAYOUT)
    saver.save(8, model, optimizer, schedule, data)
    saver.finalize()
    assert json.loads((tmp_path / "step-00000008" / "manifest.json").read_text())["layout"] == LAYOUT
    capsys.readouterr()
    for layout in (LAYOUT, None, LAYOUT | {"dp_shard": 8, "tp": 1}, {"world_size": 1, "pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1, "offload": True}):
        assert build_checkpointer(tmp_path, CheckpointConfig(), layout=layout).resume(model, optimizer, schedule, data) == 8
    assert capsys.readouterr().out.splitlines() == [
        "ebb: resharding step-00000008 from dp_shard=4 x tp=2 to dp_shard=8",
        "ebb: resharding step-00000008 from dp_shard=4 x tp=2 to one process with optimizer offload",
    ]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A committed run of the tiny MTG* model (one process)."""
    from pretrain.config import load_config
    from pretrain.train import train
    from tests.runs import SMALL_RUN

    run = tmp_path_factory.mktemp("small") / "run"
    train(load_config(None, [*SMALL_RUN, f"train.run_dir={run}", "train.steps=2"]), resume=False)
    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout, world, cause",
    [(["parallel.tp=4"], 4, "must be divisible by parallel.tp (4)"), (["parallel.pp=8", "parallel.pp_microbatches=1"], 8, "(8) pipeline stages need at least as many blocks (model has 4)")],
    ids=["tp", "pp"],
)
def test_a_layout_that_cannot_hold_the_model_is_refused_before_resuming(small_run, layout, world, cause):
    """Rank 0 of a torchrun world that cannot hold the model: one line, exit 2, before any
    rendezvous; the run directory is as it was, byte for byte."""
    from tests.runs import SMALL_RUN, assert_one_error, cli

    before = {p: p.read_bytes() for p in sorted(small_run.rglob("*")) if p.is_file()}
    result = cli("pretrain.train", *SMALL_RUN, f"train.run_dir={small_run}", "train.steps=4", *layout, "--resume", env={"WORLD_SIZE": str(world), "RANK": "0"})
    assert_one_error(result, cause)
    assert {p: p.read_bytes() for p in sorted(small_run.rglob("*")) if p.is_file()} == before
