import json
import random

import pytest
import torch

from checkpoint import CheckpointConfig, CheckpointError, build_checkpointer, manifest
from checkpoint.manager import find_latest, resolve_checkpoint
from checkpoint.storage import ALGORITHM, file_checksum
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


def test_missing_and_corrupt_checkpoints_are_one_line_errors(tmp_path):
    model, optimizer, schedule, data = make_state(0)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Saver(tmp_path / "none", keep_last=1).resume(model, optimizer, schedule, data)
    saved = Saver(tmp_path, keep_last=1).save(5, model, optimizer, schedule, data)
    for shard in saved.glob("*.distcp"):
        shard.write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match=r"no loadable checkpoint .*__0_0\.distcp has \d+ bytes, the manifest says") as err:
        Saver(tmp_path, keep_last=1).resume(model, optimizer, schedule, data)
    assert "\n" not in str(err.value)
    old = json.loads((saved / "manifest.json").read_text())
    (saved / "manifest.json").write_text(json.dumps(old | {"files": {k: {"size": v["size"], "crc32": 1} for k, v in old["files"].items()}}))
    with pytest.raises(CheckpointError, match=r"manifest\.json has no xxh3_64 checksum for .* \(written by an older ebb\)"):
        Saver(tmp_path, keep_last=1).resume(model, optimizer, schedule, data)
    (saved / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata is missing"):
        Saver(tmp_path, keep_last=1).resume(model, optimizer, schedule, data)
    (saved / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"step-00000005 has no manifest\.json"):
        Saver(tmp_path, keep_last=1).resume(model, optimizer, schedule, data)


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
