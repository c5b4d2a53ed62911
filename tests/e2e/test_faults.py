"""Faults of a training run, injected for real, as `python -m pretrain.train` meets them: each is
one `error:` line (warnings on `ebb:` lines), exit code 2, and the checkpoints and metrics already
written are intact afterwards (their files byte for byte, or a resume that matches an
uninterrupted run step for step).

Read-only and small directories are real mounts (a read-only bind mount, a tiny tmpfs) in a
mount namespace of the test's own (`unshare -m`, as root); those tests are skipped where that is
not allowed.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoint import QUARANTINE, Ranks, verify_together
from checkpoint.lazy import WRITE_DELAY_ENV
from checkpoint.manager import committed_checkpoints, find_latest
from tests.runs import REPO, SMALL_RUN, assert_one_error, cli, strict_records

pytestmark = pytest.mark.slow  # seconds each (subprocess runs): CI runs them, the fast loop skips them

TRAIN = "pretrain.train"


def train(run_dir: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return cli(TRAIN, *SMALL_RUN, f"train.run_dir={run_dir}", *extra, env=env)


def trained(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    result = train(run_dir, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in strict_records(run_dir)]


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, by relative path (a run's checkpoints, metrics, config)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}


def intact(checkpoint: Path) -> Path:
    verify_together(Ranks(None), checkpoint)
    return checkpoint


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """Six steps, checkpoints at 4 and 6 (interval 2, keep_last 2)."""
    run_dir = tmp_path_factory.mktemp("baseline")
    trained(run_dir)
    return run_dir


@pytest.fixture
def copy_of(baseline, tmp_path):
    def make(name: str = "run") -> Path:
        return Path(shutil.copytree(baseline, tmp_path / name))

    return make


# ---- resume past damage ----------------------------------------------------------------------

def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte": (lambda c: flip_a_byte(c / "__0_0.distcp"), "__0_0.distcp does not match its checksum"),
    "missing manifest": (lambda c: (c / "manifest.json").unlink(), "has no manifest.json"),
    "missing shard": (lambda c: (c / "__0_0.distcp").unlink(), "__0_0.distcp is missing"),
    "truncated shard": (lambda c: os.truncate(c / "__0_0.distcp", 64), "__0_0.distcp has 64 bytes"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_moves_a_damaged_checkpoint_aside_and_goes_on(copy_of, baseline, damage):
    run = copy_of()
    newest = run / "checkpoints" / "step-00000006"
    inflict, reason = DAMAGE[damage]
    inflict(newest)
    damaged = files_of(newest)
    result = trained(run, "--resume")
    moved = run / "checkpoints" / QUARANTINE / "step-00000006"
    warning, resuming = result.stderr.splitlines()
    assert warning.startswith(f"ebb: warning: checkpoint {newest} is damaged (") and reason in warning and warning.endswith(f"moved it to {moved}")
    assert resuming == f"ebb: resuming from {run / 'checkpoints' / 'step-00000004'}, the newest intact checkpoint"
    assert f"resumed from {run / 'checkpoints' / 'step-00000004'}" in result.stdout
    assert files_of(moved) == damaged  # kept whole, not deleted
    assert intact(find_latest(run / "checkpoints")) == newest  # step 6 again, committed this time
    assert losses(run) == losses(baseline)  # steps 5 and 6 retrained exactly
    again = trained(run, "--resume")  # no dead end: the next resume starts from the new step 6
    assert "done: nothing to train (at step 6)" in again.stdout and again.stderr == ""


# ---- divergence ------------------------------------------------------------------------------

def test_a_diverged_step_stops_the_run_before_its_update(tmp_path):
    """lr 1e6 sends the loss to NaN at step 2: the run stops there, after the checkpoint of step
    1 (a good state) is committed and before any of step 2; metrics.jsonl stays strict JSON."""
    run = tmp_path / "run"
    result = train(run, "optim.lr=1e6", "optim.warmup_steps=0", "checkpoint.interval=1", "train.eval_interval=0")
    assert_one_error(result, "step 2 diverged (loss nan, gradient norm nan); stopped before its update, so no checkpoint holds it")
    assert [p.name for p in committed_checkpoints(run / "checkpoints")] == ["step-00000001"]
    intact(run / "checkpoints" / "step-00000001")
    records = strict_records(run)
    assert [r["step"] for r in records] == [1, 2] and records[1]["loss"] is None and records[1]["skipped"] is True


def test_skip_step_drops_diverged_updates_up_to_the_limit(tmp_path):
    run = tmp_path / "run"
    result = train(run, "optim.lr=1e6", "optim.warmup_steps=0", "train.eval_interval=0", "train.on_nonfinite=skip_step", "train.max_skipped_steps=3")
    assert_one_error(result, "step 4: 3 steps in a row diverged (loss nan, gradient norm nan); stopped (train.max_skipped_steps=3")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("ebb: warning:")]
    assert [w.split(" diverged")[0] for w in warnings] == ["ebb: warning: step 2", "ebb: warning: step 3"]
    assert all("its update was skipped" in w for w in warnings)
    assert [r["step"] for r in strict_records(run)] == [1, 2, 3, 4]
    intact(find_latest(run / "checkpoints"))  # step 2: the state after step 1, which skipped steps left alone


# ---- generation verifies -----------------------------------------------------------------------

def test_generate_refuses_a_damaged_checkpoint_and_passes_over_it_in_a_run_dir(copy_of):
    run = copy_of()
    newest = run / "checkpoints" / "step-00000006"
    flip_a_byte(newest / "__0_0.distcp")
    before = files_of(run)
    named = cli("pretrain.generate", "--checkpoint", str(newest), "--prompt", "def f(", "--max-new-tokens", "4")
    assert_one_error(named, "step-00000006/__0_0.distcp does not match its checksum in the manifest")
    assert named.stdout == ""
    from_run = cli("pretrain.generate", "--checkpoint", str(run), "--prompt", "def f(", "--max-new-tokens", "4")
    assert from_run.returncode == 0 and from_run.stdout.startswith("def f(")
    assert from_run.stderr == f"ebb: warning: checkpoint {newest} is damaged (step-00000006/__0_0.distcp does not match its checksum in the manifest); taking the one before\n"
    assert files_of(run) == before  # a reader moves nothing


# ---- one run per run directory -------------------------------------------------------------------

def wait_for_records(run_dir: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (run_dir / "metrics.jsonl").exists() or len((run_dir / "metrics.jsonl").read_text().splitlines()) < count:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run did not reach its first steps"
        time.sleep(0.05)


def start(run_dir: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", TRAIN, *SMALL_RUN, f"train.run_dir={run_dir}", *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )


def test_a_second_run_in_a_run_dir_is_refused_and_a_killed_owner_leaves_no_lock(tmp_path):
    run = tmp_path / "run"
    first = start(run, "train.steps=100000", "train.eval_interval=0")
    try:
        wait_for_records(run, 3, first)
        second = train(run, "train.steps=100000", "train.eval_interval=0")
        assert_one_error(second, f"{run.resolve()} is in use by another run (pid {first.pid} on ")
        assert first.poll() is None  # the owner trains on, its metrics untouched
        wait_for_records(run, 8, first)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    steps = [r["step"] for r in strict_records(run)]
    assert steps == list(range(1, len(steps) + 1))
    latest = intact(find_latest(run / "checkpoints"))
    resumed = trained(run, "--resume", "train.steps=100000", "train.eval_interval=0", f"train.stop_at_step={int(latest.name[5:]) + 2}")
    assert f"resumed from {latest}" in resumed.stdout  # the kernel released the killed owner's lock
    steps = [r["step"] for r in strict_records(run)]
    assert steps == list(range(1, len(steps) + 1))  # each step once


# ---- directories -------------------------------------------------------------------------------

def mounts_allowed() -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(shutil.which("unshare") is None or not mounts_allowed(), reason="needs unshare -m and mount (root)")


def train_under_mount(mount: str, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m pretrain.train` in a private mount namespace, after the shell command `mount`."""
    args = " ".join(f"'{a}'" for a in [*SMALL_RUN, f"train.run_dir={run_dir}", *extra])
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", f"{mount} && exec {sys.executable} -m {TRAIN} {args}"], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_a_run_dir_that_is_a_file_or_under_one_is_one_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    assert_one_error(train(path), f"train.run_dir {path} is a file, not a directory")
    assert_one_error(train(path / "run"), f"train.run_dir {path / 'run'} cannot be created: {path} is a file")
    assert_one_error(train(tmp_path / "run", f"checkpoint.dir={path}"), f"checkpoint.dir {path} is a file, not a directory")
    assert path.read_text() == "mine\n"


@needs_mounts
def test_a_read_only_run_dir_is_one_line_before_any_work(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    result = train_under_mount(f"mount --bind -o ro {run} {run}", run)
    assert_one_error(result, f"train.run_dir {run} is not writable: Read-only file system")


@needs_mounts
def test_resume_in_a_read_only_run_dir_is_one_line_and_touches_nothing(copy_of):
    run = copy_of()
    before = files_of(run)
    result = train_under_mount(f"mount --bind -o ro {run} {run}", run, "--resume")
    assert_one_error(result, f"train.run_dir {run} is not writable: Read-only file system")
    assert files_of(run) == before


@needs_mounts
def test_a_checkpoint_dir_without_room_for_one_checkpoint_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    result = train_under_mount(f"mount -t tmpfs -o size=64k tmpfs {run}", run)
    assert_one_error(result, f"checkpoint dir {run / 'checkpoints'} has 64 KiB free, and one checkpoint of this model needs about ")


# ---- metrics on resume ---------------------------------------------------------------------------

def test_a_torn_last_metrics_line_is_dropped_on_resume(copy_of, baseline):
    """As left by a run killed while writing step 5's record, after its checkpoint of step 4."""
    run = copy_of()
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:4]) + lines[4][:20])
    result = trained(run, "--resume")
    assert result.stderr == f"ebb: warning: {run / 'metrics.jsonl'}: dropped its last line, cut short by an interrupted write\n"
    assert losses(run) == losses(baseline)


# ---- another config on resume --------------------------------------------------------------------

@pytest.mark.parametrize(
    "change, named",
    [
        (["optim.state_dtype=int8", "optim.min_quant_numel=0"], "optim.min_quant_numel (4096 there, 0 here), optim.state_dtype ('fp32' there, 'int8' here)"),
        (["model.pattern=MT*G"], "model.pattern ('MTG*' there, 'MT*G' here)"),
    ],
    ids=["state_dtype", "pattern"],
)
def test_another_config_on_resume_is_a_mismatch_naming_the_keys_not_damage(copy_of, change, named):
    run = copy_of()
    before = files_of(run)
    error = assert_one_error(train(run, "--resume", "train.steps=8", *change), f"checkpoint {run / 'checkpoints' / 'step-00000006'} was saved with another config: {named}")
    assert "the checkpoint is intact" in error and "damaged" not in error
    assert files_of(run) == before and not (run / "checkpoints" / QUARANTINE).exists()


# ---- signals -----------------------------------------------------------------------------------

LONG = ["train.steps=100000", "train.eval_interval=0", "checkpoint.interval=1000"]


def stopped(proc: subprocess.Popen) -> tuple[int, str, str]:
    """The run's exit status and output once it ends; killed, and the test failed, if it does not within 2 minutes."""
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out, err


def test_sigterm_saves_the_step_it_ends_and_the_run_resumes_as_if_never_stopped(tmp_path):
    run = tmp_path / "run"
    proc = start(run, *LONG)
    wait_for_records(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    status, _, err = stopped(proc)
    step = strict_records(run)[-1]["step"]
    saved = run / "checkpoints" / f"step-{step:08d}"
    assert status == 128 + signal.SIGTERM and err == f"ebb: SIGTERM after step {step}: saved {saved}; continue with --resume\n"
    intact(saved)
    trained(run, "--resume", *LONG, f"train.stop_at_step={step + 2}")
    trained(tmp_path / "uninterrupted", *LONG, f"train.stop_at_step={step + 2}")
    assert losses(run) == losses(tmp_path / "uninterrupted")


def test_sigint_with_on_signal_exit_stops_without_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = start(run, *LONG, "checkpoint.on_signal=exit")
    wait_for_records(run, 3, proc)
    proc.send_signal(signal.SIGINT)
    status, _, err = stopped(proc)
    step = strict_records(run)[-1]["step"]
    assert status == 128 + signal.SIGINT
    assert err == f"ebb: SIGINT after step {step}: stopped without a checkpoint (checkpoint.on_signal=exit; newest: none yet)\n"
    assert committed_checkpoints(run / "checkpoints") == []


def test_a_second_signal_exits_at_once_and_the_committed_checkpoints_stay_intact(tmp_path):
    """The checkpoint the first signal asks for is slowed down (a sleep per tensor written); the
    second signal ends the process in the middle of writing it."""
    run = tmp_path / "run"
    proc = start(run, *LONG[:-1], "checkpoint.interval=2", env={WRITE_DELAY_ENV: "0.002"})
    wait_for_records(run, 5, proc)
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while not list((run / "checkpoints").glob(".tmp-step-*/*.distcp")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    time.sleep(1.2)  # past the window in which a repeat counts as the same signal
    proc.send_signal(signal.SIGTERM)
    status, _, err = stopped(proc)
    assert status == 128 + signal.SIGTERM and err == "ebb: second SIGTERM: exiting at once; the committed checkpoints are intact\n"
    latest = intact(find_latest(run / "checkpoints"))
    resumed = trained(run, "--resume", *LONG[:-1], "checkpoint.interval=2", f"train.stop_at_step={int(latest.name[5:]) + 1}")
    assert f"resumed from {latest}" in resumed.stdout


def test_a_signal_while_the_run_starts_is_one_line(tmp_path):
    proc = start(tmp_path / "run", *LONG)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    status, out, err = stopped(proc)
    assert status == 128 + signal.SIGINT
    assert err in ("ebb: SIGINT while starting: stopped, nothing to save\n", "ebb: SIGINT before the first step: stopped, nothing to save\n"), err
