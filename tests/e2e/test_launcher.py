"""A killed launcher, a killed rank and a hung rank, for real: torchrun (`python -m
torch.distributed.run`, or launch/torchrun.sh) with 2 ranks of a tiny FSDP run on gloo, SIGKILLed
or SIGSTOPped by the test, which finds the ranks by parent pid (never by name: other runs share the
machine) and kills whatever is left at the end.

A killed launcher: every rank ends within seconds with one line, the run directory's lock is free,
the checkpoint being flushed is committed and intact, and `--resume` continues from it with the
losses and gradient norms of an unbroken run to the bit. A killed rank: the other rank and
torchrun end with one line, nothing committed lost. A hung rank: its peer gives up after
`parallel.collective_timeout_s`. bench/kill_storm.py (its helpers are these tests') runs one round
here.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoint.lazy import WRITE_DELAY_ENV
from tests.runs import REPO, load_bench, records

storm = load_bench("kill_storm")
Launch, lock_is_free, newest_intact, step_of = storm.Launch, storm.lock_is_free, storm.newest_intact, storm.step_of

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PLAIN = [*storm.TINY, "parallel.dp_shard=2", "checkpoint.interval=4"]
OFFLOADED = [*storm.STORM, "checkpoint.interval=3"]  # int8 states, optimizer offload
END = 10  # the step the unbroken runs and the resumed ones end after
GONE_WITHIN_S = 30.0
LAUNCHER_LINE = re.compile(r"ebb: the launcher \(pid (\d+)\) is gone: stopped after step (\d+) \(newest checkpoint: (.+)\); continue with --resume")


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records(run_dir)]


def wait_for_step(run_dir: Path, step: int, launch: Launch, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while storm.last_logged_step(run_dir) < step:
        assert launch.torchrun.poll() is None and time.monotonic() < deadline, launch.stderr()[-3000:]
        time.sleep(0.02)


def unbroken(run_dir: Path, config: list[str]) -> list[tuple[int, float, float]]:
    launch = Launch.start([*config, f"train.run_dir={run_dir}", f"train.stop_at_step={END}"], run_dir.parent / "logs")
    assert launch.wait(timeout=600) == 0, launch.stderr()[-3000:]
    return losses(run_dir)


@pytest.fixture(scope="module")
def unbroken_plain(tmp_path_factory) -> list[tuple[int, float, float]]:
    return unbroken(tmp_path_factory.mktemp("plain") / "run", PLAIN)


@pytest.fixture(scope="module")
def unbroken_offloaded(tmp_path_factory) -> list[tuple[int, float, float]]:
    return unbroken(tmp_path_factory.mktemp("offloaded") / "run", OFFLOADED)


def kill_launcher(launch: Launch) -> float | None:
    """SIGKILL torchrun's process group (torchrun alone); seconds until every rank has ended."""
    launch.kill("launcher")
    return launch.wait_gone(GONE_WITHIN_S)


def the_launcher_line(launch: Launch) -> tuple[int, Path]:
    """The one line the ranks leave (torchrun's own start-up banner aside); the step they
    stopped after and the newest checkpoint it names."""
    said = [line for line in launch.stderr().splitlines() if line.startswith(("ebb:", "error:", "Traceback"))]
    assert len(said) == 1, launch.stderr()[-3000:]
    found = LAUNCHER_LINE.fullmatch(said[0])
    assert found is not None and int(found[1]) == launch.torchrun.pid, said[0]
    return int(found[2]), Path(found[3])


def resumed_to_the_end(run_dir: Path, config: list[str], newest: Path, tmp_path: Path) -> list[tuple[int, float, float]]:
    launch = Launch.start(["--resume", *config, f"train.run_dir={run_dir}", f"train.stop_at_step={END}"], tmp_path / "resume-logs")
    assert launch.wait(timeout=600) == 0, launch.stderr()[-3000:]
    assert f"resumed from {newest}" in launch.stdout()
    return losses(run_dir)


# A process that watches its parent as a rank does (before or in the training loop, which here
# never ends a step), with 0.5 s to stop once the parent is gone.
WATCHER = """
import os, sys, time
from pretrain.signals import StopSignals
stop = StopSignals()
stop.in_loop = sys.argv[1] == "in the loop"
stop.watch_launcher(os.getppid(), grace_s=0.5)
print(os.getpid(), flush=True)
time.sleep(60)
"""
PARENT = "import subprocess, sys; subprocess.run(sys.argv[1:])"


@pytest.mark.parametrize(
    "launcher, phase, expected",
    [
        ({"TORCHELASTIC_RUN_ID": "x"}, "before the loop", "ebb: the launcher (pid {}) is gone before the first step: stopped, nothing to save"),
        (
            {"SLURM_STEP_ID": "0"}, "in the loop",
            "ebb: the launcher (pid {}) is gone and rank 0 did not stop within 0.5s (parallel.collective_timeout_s): exiting at once; "
            "the committed checkpoints are intact",
        ),
        ({}, "in the loop", None),  # not started by a launcher: its parent's death is not its business
    ],
    ids=["torchrun-before-the-loop", "srun-stuck-in-the-loop", "no-launcher"],
)
def test_the_launcher_watch_ends_a_rank_whose_launcher_is_killed(launcher, phase, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "SLURM_STEP_ID")} | launcher | {"PYTHONPATH": str(REPO)}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, sys.executable, "-c", WATCHER, phase], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    child = storm.Proc.of(int(parent.stdout.readline()))
    parent.kill()
    parent.wait()
    killed = time.monotonic()
    try:
        if expected is None:
            time.sleep(2)
            assert child.alive()
            return
        _, err = parent.communicate(timeout=30)  # until the child, the pipes' last writer, has closed them
        while child.alive() and time.monotonic() - killed < 5:  # and gone on to end
            time.sleep(0.01)
        assert not child.alive()
        assert err == expected.format(parent.pid) + "\n"
    finally:
        if child.alive():
            os.kill(child.pid, signal.SIGKILL)


def test_a_killed_launcher_stops_its_ranks_and_the_run_resumes_bit_exact(tmp_path, unbroken_plain):
    run = tmp_path / "run"
    launch = Launch.start([*PLAIN, f"train.run_dir={run}"], tmp_path / "logs")
    try:
        launch.find_ranks()
        wait_for_step(run, 6, launch)
        gone_in = kill_launcher(launch)
    finally:
        launch.end()
    assert gone_in is not None, f"a rank still ran {GONE_WITHIN_S}s after torchrun was killed"
    step, newest = the_launcher_line(launch)
    assert storm.last_logged_step(run) == step < END
    assert lock_is_free(run)
    # the checkpoint requested last (every 4 steps) was committed, whole, and none is left half written
    assert newest == newest_intact(run / "checkpoints") and step_of(newest) == step // 4 * 4
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert resumed_to_the_end(run, PLAIN, newest, tmp_path) == unbroken_plain


def test_a_killed_launcher_lets_the_flush_under_way_commit_with_offload_and_int8_states(tmp_path, unbroken_offloaded):
    """The lazy flush is slowed (a sleep per tensor written); torchrun is killed while it writes.
    Under offload the next optimizer step waits for the flush of the host-resident state, so the
    ranks stop only once it is written; it commits."""
    run = tmp_path / "run"
    launch = Launch.start([*OFFLOADED, f"train.run_dir={run}"], tmp_path / "logs", env={WRITE_DELAY_ENV: "0.02"})
    try:
        launch.find_ranks()
        deadline = time.monotonic() + 300
        while not (shards := list((run / "checkpoints").glob(".tmp-step-*/*.distcp"))):
            assert launch.torchrun.poll() is None and time.monotonic() < deadline, launch.stderr()[-3000:]
            time.sleep(0.01)
        flushed = int(shards[0].parent.name.removeprefix(".tmp-step-"))
        gone_in = kill_launcher(launch)
    finally:
        launch.end()
    assert gone_in is not None, f"a rank still ran {GONE_WITHIN_S}s after torchrun was killed"
    step, newest = the_launcher_line(launch)
    assert step < END and lock_is_free(run)
    assert newest == newest_intact(run / "checkpoints") and step_of(newest) >= flushed
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert resumed_to_the_end(run, OFFLOADED, newest, tmp_path) == unbroken_offloaded


def test_a_killed_rank_ends_the_run_with_one_line_and_loses_nothing(tmp_path):
    """Through launch/torchrun.sh, every rank's lines on the console: rank 0 (the lock's owner and
    the committer) is SIGKILLed; torchrun stops rank 1, whose collectives with rank 0 fail at once."""
    run = tmp_path / "run"
    env = {**os.environ, "NPROC": "2", "LOG_DIR": str(tmp_path / "logs"), "LOG_RANKS": ""}
    args = ["bash", "launch/torchrun.sh", "configs/quickstart.yaml", *PLAIN, "checkpoint.interval=2", f"train.run_dir={run}"]
    script = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ranks = []
    try:
        deadline = time.monotonic() + 300
        while len(ranks) < 2 or storm.last_logged_step(run) < 5:
            assert script.poll() is None and time.monotonic() < deadline, script.communicate()[1][-3000:]
            ranks = sorted((r for c in storm.children(script.pid) for r in storm.children(c.pid) if storm.rank_of(r) is not None), key=storm.rank_of)
            time.sleep(0.05)
        committed = step_of(newest_intact(run / "checkpoints"))
        os.kill(ranks[0].pid, signal.SIGKILL)
        _, err = script.communicate(timeout=120)
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
        for rank in ranks:
            if rank.alive():
                os.kill(rank.pid, signal.SIGKILL)
    assert script.returncode == 128 + signal.SIGKILL, err[-3000:]
    found = re.fullmatch(
        r"error: rank 1 lost contact with the other ranks at step (\d+) \((.+)\); stopped "
        r"\(newest checkpoint: (.+); continue with --resume once every rank can run\)\n", err,
    )
    assert found is not None, err[-3000:]
    assert not any(rank.alive() for rank in ranks) and lock_is_free(run)
    newest = newest_intact(run / "checkpoints")
    assert Path(found[3]) == newest and step_of(newest) >= committed


def test_a_hung_rank_is_given_up_after_the_collective_timeout(tmp_path):
    """Rank 1 is stopped (SIGSTOP: alive, connections open, silent); rank 0 gives up after
    parallel.collective_timeout_s (10 s here) with one line naming itself and the step."""
    run = tmp_path / "run"
    launch = Launch.start([*PLAIN, "parallel.collective_timeout_s=10", f"train.run_dir={run}"], tmp_path / "logs")
    try:
        rank0, rank1 = launch.find_ranks()
        wait_for_step(run, 5, launch)  # past the first checkpoint
        os.kill(rank1.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        while rank0.alive():
            assert time.monotonic() - stopped_at < 10 + GONE_WITHIN_S, "rank 0 waits on its hung peer past the timeout"
            time.sleep(0.05)
        waited = time.monotonic() - stopped_at
    finally:
        launch.end()
    assert waited >= 10 - 1  # the timeout, counted from rank 0's first collective after the stop
    said = [line for line in launch.stderr().splitlines() if line.startswith(("ebb:", "error:", "Traceback"))]
    assert len(said) == 1, launch.stderr()[-3000:]
    found = re.fullmatch(
        r"error: rank 0 lost contact with the other ranks at step (\d+) \(Timed out waiting 10000ms for \w+ operation to complete\); "
        r"stopped \(newest checkpoint: (.+); continue with --resume once every rank can run\)", said[0],
    )
    assert found is not None, said[0]
    last = storm.last_logged_step(run)  # rank 0 logged it, then waited at its end or in the next step
    assert int(found[1]) in (last, last + 1) and found[2] == str(newest_intact(run / "checkpoints") or "none yet")


def test_the_kill_storm_runs_a_round(tmp_path):
    result = storm.main(["--kills", "1", "--seed", "3", "--work", str(tmp_path / "work"), "--output", str(tmp_path / "storm.json")])
    assert result["kills"] == 1 and result["failed"] == 0, result["rounds"]
    assert (tmp_path / "storm.json").exists()
