"""Lazy (and DCP async) checkpoints in one process: the snapshot is of the requested step, damaged
checkpoints are passed over with a message, and storage errors follow `checkpoint.on_error`.

Storage errors are injected by making DCP's per-item file write raise (tests run as root, for
whom chmod does not make a directory read-only, and mounting a small tmpfs needs privileges)."""
from __future__ import annotations

import dataclasses
import errno
import time

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem

from checkpoint import CheckpointConfig, CheckpointError, build_checkpointer, dcp
from checkpoint.lazy import WRITE_DELAY_ENV, Snapshot, StreamingSavePlanner, tensors_of
from checkpoint.manager import committed_checkpoints, find_latest, verify_together
from checkpoint.ranks import Ranks
from checkpoint.resident import ResidentFlush
from common.tensors import local_shard
from pretrain.train import main as train_main
from tests.runs import SMALL_RUN
from tests.toy_state import make_state, train_steps

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process


def checkpointer(root, **settings):
    return build_checkpointer(root, CheckpointConfig(**{"mode": "lazy", "keep_last": 3} | settings))


def values(model, optimizer) -> dict[str, torch.Tensor]:
    """A synchronous copy of everything a checkpoint holds."""
    state = dcp.capture_state(model, optimizer)
    flat = {f"model.{k}": v for k, v in state["model"].items()} | {f"optimizer.{k}": v for k, v in state["optimizer"].items()}
    return {k: v.detach().clone() for k, v in flat.items() if isinstance(v, torch.Tensor)}


def slow_writes(monkeypatch, seconds: float) -> None:
    """Every tensor DCP writes to a file takes `seconds` longer (in any mode)."""
    write_item = dcp_filesystem._write_item

    def slow(*args):
        time.sleep(seconds)
        return write_item(*args)

    monkeypatch.setattr(dcp_filesystem, "_write_item", slow)


def slow_copy(monkeypatch, seconds: float) -> None:
    """Copies to host memory start `seconds` late, so that the next optimizer step must wait."""
    copy = Snapshot._copy

    def late(self, *args):
        time.sleep(seconds)
        return copy(self, *args)

    monkeypatch.setattr(Snapshot, "_copy", late)


def assert_snapshot_is_of_the_requested_step(tmp_path, monkeypatch, mode: str, device: str) -> None:
    """The next optimizer steps run while the copy and the (slowed) flush are still going; the
    checkpoint still holds the values of the step it was requested at."""
    slow_writes(monkeypatch, 0.01)
    slow_copy(monkeypatch, 0.3)
    model, optimizer, schedule, data = make_state(0, device)
    saver = checkpointer(tmp_path, mode=mode)
    saver.attach(optimizer)
    train_steps(model, optimizer, schedule, 2)
    expected = values(model, optimizer)
    saver.save(2, model, optimizer, schedule, data)
    train_steps(model, optimizer, schedule, 3)  # each optimizer step waits for the snapshot, not for the flush
    assert saver.pending is not None and not saver.pending[1].done()  # the flush was still running
    after = values(model, optimizer)
    assert any(not torch.equal(after[k], expected[k]) for k in expected)
    saver.finalize()

    fresh, fresh_optimizer, fresh_schedule, fresh_data = make_state(1, device)
    assert checkpointer(tmp_path).resume(fresh, fresh_optimizer, fresh_schedule, fresh_data) == 2
    loaded = values(fresh, fresh_optimizer)
    assert loaded.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(loaded[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("mode", ["lazy", "async"])
def test_snapshot_is_of_the_requested_step(tmp_path, monkeypatch, mode):
    assert_snapshot_is_of_the_requested_step(tmp_path, monkeypatch, mode, "cpu")


OFFLOAD = {"offload": {"enabled": True, "subgroup_size": 16, "gpu_every_k": 2, "host_optimizer": "torch"}}  # 124 elements: 8 subgroups


def record_reads(monkeypatch) -> list[tuple[int, int, int]]:
    """Where in the step's order (`ResidentFlush._position`) each tensor the writer reads in place lies, in the order read."""
    read, order = ResidentFlush.read, []

    def recording(self, tensor):
        order.append(self._position(tensor))
        return read(self, tensor)

    monkeypatch.setattr(ResidentFlush, "read", recording)
    return order


@pytest.mark.parametrize("staging", [0, 2], ids=["wait", "copy-aside"])
def test_offloaded_state_is_written_in_place_and_holds_the_requested_step(tmp_path, monkeypatch, staging):
    """The moments are written from the offload's host buffers, first and in the order the step
    updates them; the next steps update every subgroup while the flush is still writing, each
    copying aside (into at most `staging` reused slots) or waiting for just the subgroups not yet
    read; the checkpoint holds the state at the request, bit for bit."""
    slow_writes(monkeypatch, 0.02)
    order = record_reads(monkeypatch)
    model, optimizer, schedule, data = make_state(0, **OFFLOAD)
    saver = checkpointer(tmp_path, staging_subgroups=staging)
    saver.attach(optimizer)
    train_steps(model, optimizer, schedule, 2)
    expected = values(model, optimizer)
    saver.save(2, model, optimizer, schedule, data)
    flush = saver.in_place
    resident = {t.untyped_storage().data_ptr() for t in optimizer.host_resident}
    in_place = [t for t in tensors_of(saver.snapshot.host_state) if local_shard(t).untyped_storage().data_ptr() in resident]
    assert len(in_place) == 2 * len(list(model.parameters()))  # exp_avg and exp_avg_sq: no host copy of them
    train_steps(model, optimizer, schedule, 2)
    assert saver.pending is not None and not saver.pending[1].done()  # the steps did not wait for the whole write
    if staging:
        assert flush.staged_count > 0 and 0 < len(flush.slots) <= staging
        assert all(b.numel() == 16 for slot in flush.slots for b in slot)  # one subgroup each
    else:
        assert flush.waited_count > 0 and flush.staged_count == 0 and flush.slots == []
    after = values(model, optimizer)
    assert all(not torch.equal(after[k], expected[k]) for k in expected if k.endswith(("exp_avg", "exp_avg_sq")))
    saver.finalize()
    assert len(order) == len(in_place) and order == sorted(order)

    fresh, fresh_optimizer, fresh_schedule, fresh_data = make_state(1, **OFFLOAD)
    assert checkpointer(tmp_path).resume(fresh, fresh_optimizer, fresh_schedule, fresh_data) == 2
    loaded = values(fresh, fresh_optimizer)
    assert loaded.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(loaded[key], expected[key], rtol=0, atol=0, msg=key)


def test_a_snapshot_another_rank_could_not_stage_leaves_the_offloaded_state_free(tmp_path, monkeypatch):
    """Every rank gives the checkpoint up; the next step updates the subgroups the snapshot
    guarded without waiting for a writer that will never come."""
    model, optimizer, schedule, data = make_state(0, **OFFLOAD)
    saver = checkpointer(tmp_path, staging_subgroups=0, on_error="warn")
    saver.attach(optimizer)
    train_steps(model, optimizer, schedule, 1)
    agree, others = Ranks.agree, iter([None, "rank 1 could not stage"])  # the staging directory is made; the snapshot fails elsewhere
    monkeypatch.setattr(Ranks, "agree", lambda self, error: agree(self, error or next(others)))
    assert not saver.save(1, model, optimizer, schedule, data)
    monkeypatch.undo()
    assert saver.in_place is not None and not saver.in_place.active
    train_steps(model, optimizer, schedule, 1)
    assert saver.in_place.waited_count == 0 and saver.finalize() is None
    assert list(tmp_path.iterdir()) == []


def test_offloaded_tensors_another_rank_writes_are_released(tmp_path):
    """Where DCP leaves a replicated tensor to another rank, this rank's plan drops it; the
    subgroups it covered are then free as soon as the tensors this rank writes there are read."""
    model, optimizer, schedule, data = make_state(0, **OFFLOAD)
    train_steps(model, optimizer, schedule, 1)
    saver = checkpointer(tmp_path, staging_subgroups=0)
    snapshot = Snapshot(dcp.capture_state(model, optimizer), saver.buffers, saver.copier, saver._in_place(optimizer))
    flush = snapshot.in_place
    planner = StreamingSavePlanner(snapshot)
    planner.set_up_planner(snapshot.host_state, is_coordinator=True)
    local = planner.create_local_plan()
    resident = [i for i, item in enumerate(local.items) if isinstance(t := planner._local(item), torch.Tensor) and flush.holds(t)]
    params = len(list(model.parameters()))
    assert resident == list(range(2 * params))  # exp_avg and exp_avg_sq, written first
    assert sum(flush.pending) > 0 and all(flush.pending)
    kept = [item for item in local.items if not item.index.fqn.endswith("exp_avg_sq")]  # another rank writes these
    planner.finish_plan(dataclasses.replace(local, items=kept))
    for item in kept[:params]:
        flush.read(planner._local(item))
    assert flush.pending == [0] * len(flush.ranges)
    snapshot.written()
    saver.finalize()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["lazy", "async"])
def test_snapshot_of_gpu_tensors_is_of_the_requested_step(tmp_path, monkeypatch, mode):
    """The same with device-to-host copies on a side stream into pinned buffers."""
    assert_snapshot_is_of_the_requested_step(tmp_path, monkeypatch, mode, "cuda")


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    model, optimizer, schedule, data = make_state(0)
    saver = checkpointer(tmp_path)
    saver.attach(optimizer)
    train_steps(model, optimizer, schedule, 2)
    expected = values(model, optimizer)
    saver.save(2, model, optimizer, schedule, data)
    train_steps(model, optimizer, schedule, 2)
    saver.save(4, model, optimizer, schedule, data)
    saver.finalize()
    shard = tmp_path / "step-00000004" / "__0_0.distcp"
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size, one flipped byte
    shard.write_bytes(bytes(damaged))

    fresh, fresh_optimizer, fresh_schedule, fresh_data = make_state(1)
    assert checkpointer(tmp_path).resume(fresh, fresh_optimizer, fresh_schedule, fresh_data) == 2
    err = capsys.readouterr().err
    assert "checkpoint " + str(tmp_path / "step-00000004") + " is damaged" in err
    assert "__0_0.distcp does not match its checksum" in err and "resuming from " + str(tmp_path / "step-00000002") in err
    assert all(torch.equal(v, expected[k]) for k, v in values(fresh, fresh_optimizer).items())


def fail_writes_after(monkeypatch, good_saves: int, error: OSError) -> None:
    """DCP's file writes raise `error` once `good_saves` checkpoints have been written."""
    write_item, saves = dcp_filesystem._write_item, {"files": set()}

    def failing(transforms, stream, data, write_item_, storage_key, serialization_format):
        saves["files"].add(stream.name.rsplit("/", 2)[-2])
        if len(saves["files"]) > good_saves:
            raise error
        return write_item(transforms, stream, data, write_item_, storage_key, serialization_format)

    monkeypatch.setattr(dcp_filesystem, "_write_item", failing)


STORAGE_ERRORS = [OSError(errno.ENOSPC, "No space left on device"), PermissionError(errno.EACCES, "Permission denied")]


@pytest.mark.parametrize("error", STORAGE_ERRORS, ids=["disk-full", "read-only"])
def test_a_failed_flush_stops_training_with_on_error_fail(tmp_path, monkeypatch, error):
    fail_writes_after(monkeypatch, 1, error)
    model, optimizer, schedule, data = make_state(0)
    saver = checkpointer(tmp_path, on_error="fail")
    saver.attach(optimizer)
    train_steps(model, optimizer, schedule, 2)
    saver.save(2, model, optimizer, schedule, data)
    train_steps(model, optimizer, schedule, 2)
    saver.save(4, model, optimizer, schedule, data)
    with pytest.raises(CheckpointError) as err:
        for _ in range(100):  # reported at the first optimizer step after the flush failed
            train_steps(model, optimizer, schedule, 1)
            time.sleep(0.01)
    message = str(err.value)
    assert "\n" not in message and message.startswith("checkpoint step-00000004 was not saved: cannot write checkpoint")
    assert error.strerror in message and "on_error=fail" in message
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    assert committed_checkpoints(tmp_path) == [tmp_path / "step-00000002"] == [find_latest(tmp_path)]
    assert (tmp_path / "latest").read_text().strip() == "step-00000002"
    verify_together(Ranks(None), tmp_path / "step-00000002")  # the earlier checkpoint is intact


def test_a_failed_flush_is_reported_and_training_goes_on_with_on_error_warn(tmp_path, monkeypatch, capsys):
    fail_writes_after(monkeypatch, 1, STORAGE_ERRORS[0])
    model, optimizer, schedule, data = make_state(0)
    saver = checkpointer(tmp_path, on_error="warn")
    saver.attach(optimizer)
    for step in (2, 4):
        train_steps(model, optimizer, schedule, 2)
        saver.save(step, model, optimizer, schedule, data)
    saver.finalize()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint step-00000004 was not saved" in err and "No space left on device" in err
    assert "training goes on" in err
    monkeypatch.undo()
    saver = checkpointer(tmp_path, on_error="warn")
    saver.save(6, model, optimizer, schedule, data)  # later checkpoints are still attempted
    saver.finalize()
    assert [p.name for p in committed_checkpoints(tmp_path)] == ["step-00000002", "step-00000006"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_staging_larger_than_host_buffer_gb_is_a_clear_error(tmp_path):
    model, optimizer, schedule, data = make_state(0)
    train_steps(model, optimizer, schedule, 1)
    saver = checkpointer(tmp_path, host_buffer_gb=1e-7)
    with pytest.raises(CheckpointError, match=r"step-00000001 was not saved: this process's checkpoint needs [\d.e-]+ GiB of host staging memory, more than checkpoint\.host_buffer_gb=1e-07"):
        saver.save(1, model, optimizer, schedule, data)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("policy", ["wait", "skip"])
def test_a_request_while_the_previous_flushes_waits_or_is_skipped(tmp_path, monkeypatch, capsys, policy):
    monkeypatch.setenv(WRITE_DELAY_ENV, "0.005")
    model, optimizer, schedule, data = make_state(0)
    saver = checkpointer(tmp_path, when_busy=policy)
    saver.attach(optimizer)
    for step in (1, 2, 3):
        train_steps(model, optimizer, schedule, 1)
        saver.save(step, model, optimizer, schedule, data, final=step == 3)
    saver.finalize()
    out = capsys.readouterr().out
    if policy == "wait":
        assert [p.name for p in committed_checkpoints(tmp_path)] == ["step-00000001", "step-00000002", "step-00000003"]
        assert "checkpoint at step 2 waited" in out
    else:  # step 2 came while step 1 was flushing; the final one is never skipped
        assert [p.name for p in committed_checkpoints(tmp_path)] == ["step-00000001", "step-00000003"]
        assert "checkpoint at step 2 skipped: step-00000001 is still being written (checkpoint.when_busy=skip)" in out


@pytest.mark.slow
def test_a_run_whose_flush_fails_exits_2_with_one_line_and_keeps_its_checkpoints(tmp_path, monkeypatch, capsys):
    fail_writes_after(monkeypatch, 1, STORAGE_ERRORS[0])
    assert train_main([*SMALL_RUN, f"train.run_dir={tmp_path}", "train.eval_interval=0", "checkpoint.interval=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: checkpoint step-00000004 was not saved: cannot write checkpoint"), err
    assert "No space left on device" in err
    checkpoints = tmp_path / "checkpoints"
    assert committed_checkpoints(checkpoints) == [checkpoints / "step-00000002"]
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp")] == []
    verify_together(Ranks(None), checkpoints / "step-00000002")
