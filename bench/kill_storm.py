"""Under fire: random SIGKILLs of a 2-process torchrun run, each followed by a one-step --resume.

    python bench/kill_storm.py                 # 100 kills
    python bench/kill_storm.py --kills 5 --seed 1

The run: `python -m torch.distributed.run --standalone --nproc-per-node 2 -m pretrain.train`, a
tiny Gated DeltaNet + attention model, FSDP over 2 ranks (dp_shard 2) on gloo, int8 optimizer
states, optimizer offload, a lazy checkpoint after every step. Each round starts the run (with
--resume once there is a checkpoint) and SIGKILLs, at a random moment (while the ranks start, or
a random time into training, when a checkpoint is nearly always being flushed), a random target:
torchrun's process group (the ranks are in sessions of their own, so that kills torchrun alone),
rank 0 or rank 1. Then, checked every round:
- every process of the run (torchrun and both ranks) is gone within `--bound` seconds;
- the run directory's lock is free and the newest committed checkpoint matches its manifest;
- a one-step `--resume` under torchrun resumes from that checkpoint and commits the next step,
  whose loss and gradient norm equal the killed run's to the bit where the killed run logged it;
- the newest committed step never goes backwards.
Prints a line per round and the counts; writes bench/results/kill_storm.json. The helpers below
(starting torchrun, finding its ranks, waiting for processes to end) are the launcher tests' too
(tests/e2e/test_launcher.py).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from checkpoint import Ranks, find_latest, verify_together  # noqa: E402
from pretrain.preflight import LOCK_FILE  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pretrain.train"]

# Tiny, fast steps (a few per second with two ranks on two cores), the same numerics on every run
TINY = [
    "model.pattern=G*", "model.d_model=32", "model.vocab_size=320", "model.mlp_hidden=64", "model.tie_embeddings=false",
    "model.mixers.attention.num_heads=2", "model.mixers.gated_deltanet.num_heads=2", "model.mixers.gated_deltanet.head_dim=8",
    "model.mixers.gated_deltanet.chunk_size=8", "data.embedded_max_bytes=30000", "train.threads=1", "train.seq_len=16",
    "train.batch_size=2", "train.eval_interval=0", "train.dtype=float32", "train.device=cpu", "train.steps=100000",
    "optim.lr=3e-3", "optim.warmup_steps=1", "optim.fused=false", "logging.progress=false", "logging.tensorboard=false",
]
# What the storm runs: FSDP over both ranks, int8 states, offload, a lazy checkpoint every step
STORM = [
    *TINY, "parallel.dp_shard=2", "optim.state_dtype=int8", "optim.min_quant_numel=0", "optim.offload.enabled=true",
    "optim.offload.subgroup_size=4000", "optim.offload.host_optimizer=torch", "checkpoint.mode=lazy", "checkpoint.interval=1",
]
TARGETS = ("launcher", "rank 0", "rank 1")


@dataclass(frozen=True)
class Proc:
    """A process by pid and start time (a pid alone may be reused once it ends)."""

    pid: int
    started: int

    @classmethod
    def of(cls, pid: int) -> Proc | None:
        stat = _stat(pid)
        return None if stat is None else cls(pid, int(stat[19]))

    def alive(self) -> bool:
        """Running (a zombie, which only waits for its parent to reap it, has ended)."""
        stat = _stat(self.pid)
        return stat is not None and int(stat[19]) == self.started and stat[0] not in "ZX"


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name: state, ppid, ..., start time (index 19)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> list[Proc]:
    """The processes whose parent is `pid`, found by parent pid (not by name: others run the
    same commands on this machine)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None and int(stat[1]) == pid:
            if (proc := Proc.of(int(entry))) is not None:
                found.append(proc)
    return found


def rank_of(proc: Proc) -> int | None:
    """The RANK torchrun gave the process (None until it has started it: between fork and exec
    the child still has torchrun's environment)."""
    try:
        env = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)


@dataclass
class Launch:
    """torchrun with 2 ranks, the leader of a process group of its own; its output in files."""

    torchrun: subprocess.Popen
    out: Path
    err: Path
    ranks: list[Proc] = field(default_factory=list)

    @classmethod
    def start(cls, args: list[str], logs: Path, env: dict[str, str] | None = None) -> Launch:
        logs.mkdir(parents=True, exist_ok=True)
        out, err = logs / "stdout", logs / "stderr"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            proc = subprocess.Popen(
                [*TORCHRUN, *args], cwd=ROOT, stdout=stdout, stderr=stderr, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            )
        return cls(proc, out, err)

    def find_ranks(self, timeout: float = 120) -> list[Proc]:
        """torchrun's two children once both have started, in rank order."""
        deadline = time.monotonic() + timeout
        while len(self.ranks) < 2:
            if self.torchrun.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"torchrun did not start 2 ranks: {self.stderr()[-2000:]}")
            ranked = {rank: proc for proc in children(self.torchrun.pid) if (rank := rank_of(proc)) is not None}
            self.ranks = [ranked[r] for r in sorted(ranked)]
            time.sleep(0.02)
        return self.ranks

    def processes(self) -> list[Proc]:
        return [p for p in [Proc.of(self.torchrun.pid), *self.ranks] if p is not None]

    def kill(self, target: str) -> None:
        """SIGKILL torchrun's process group ("launcher": torchrun alone, the ranks have sessions of
        their own) or one rank ("rank 0", "rank 1")."""
        with contextlib.suppress(ProcessLookupError):  # already ended (the round reports why)
            if target == "launcher":
                os.killpg(self.torchrun.pid, signal.SIGKILL)
            else:
                os.kill(self.ranks[int(target.split()[1])].pid, signal.SIGKILL)

    def wait_gone(self, timeout: float) -> float | None:
        """Seconds until torchrun and every rank have ended, None if one still runs after `timeout`."""
        began = time.monotonic()
        watched = self.processes()
        while any(p.alive() for p in watched):
            self.torchrun.poll()  # reap torchrun (the ranks' new parent reaps them)
            if time.monotonic() - began > timeout:
                return None
            time.sleep(0.02)
        self.torchrun.poll()
        return time.monotonic() - began

    def end(self) -> None:
        """SIGKILL whatever of this launch still runs (a failed check's leftovers)."""
        for proc in self.processes():
            if proc.alive():
                os.kill(proc.pid, signal.SIGKILL)
        self.torchrun.wait()

    def wait(self, timeout: float) -> int:
        try:
            return self.torchrun.wait(timeout)
        finally:
            self.end()

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()


def lock_is_free(run_dir: Path) -> bool:
    """No process holds the run directory's lock (pretrain.preflight.DirectoryLock)."""
    if not (run_dir / LOCK_FILE).exists():
        return True
    with open(run_dir / LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def step_of(checkpoint: Path | None) -> int:
    return 0 if checkpoint is None else int(checkpoint.name.removeprefix("step-"))


def newest_intact(root: Path) -> Path | None:
    """The newest committed checkpoint, verified against its manifest (raises if damaged)."""
    latest = find_latest(root)
    if latest is not None:
        verify_together(Ranks(None), latest)
    return latest


def logged(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl's records by step (none yet: empty; a last line cut short by a kill: left out)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return {}
    records = {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        records[record["step"]] = record
    return records


def last_logged_step(run_dir: Path) -> int:
    return max(logged(run_dir), default=0)


def same_step(a: dict, b: dict) -> bool:
    """The same loss and gradient norm, to the last bit (JSON keeps a float's every bit)."""
    return (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])


def flushing(root: Path) -> bool:
    """A checkpoint is being written: a staging directory has a shard file."""
    return any(root.glob(".tmp-step-*/*.distcp"))


def kill_at_random(launch: Launch, run_dir: Path, rng: random.Random, resumed_step: int) -> tuple[str, str]:
    """Wait for a random moment (a quarter of rounds up to 12 s after the ranks start, else up to 3 s into
    training) and SIGKILL a random target; the target and the phase it hit."""
    launch.find_ranks()
    if rng.random() < 0.25:
        time.sleep(rng.uniform(0, 12))
    else:
        deadline = time.monotonic() + 180
        while last_logged_step(run_dir) <= resumed_step and time.monotonic() < deadline and launch.torchrun.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 3))
    phase = "flush" if flushing(run_dir / "checkpoints") else "training" if last_logged_step(run_dir) > resumed_step else "start"
    if launch.torchrun.poll() is not None:
        raise RuntimeError(f"the run ended on its own (torchrun exit {launch.torchrun.returncode}) before the kill: {launch.stderr()[-2000:]}")
    target = rng.choice(TARGETS)
    launch.kill(target)
    return target, phase


def one_step_resume(run_dir: Path, logs: Path, newest: Path | None, bound: float, killed_run: dict | None) -> str | None:
    """Resume from `newest` (a fresh start when none) for one step under torchrun; what went
    wrong, or None. `killed_run`: the killed run's record of that step, when it got that far,
    which the resumed step must equal to the bit."""
    resume = ["--resume"] if newest is not None else []
    launch = Launch.start([*resume, *STORM, f"train.run_dir={run_dir}", f"train.stop_at_step={step_of(newest) + 1}"], logs)
    status = launch.wait(timeout=300 + bound)
    if status != 0:
        return f"the one-step resume exited {status}: {launch.stderr()[-500:]}"
    if newest is not None and f"resumed from {newest}" not in launch.stdout():
        return f"the one-step resume did not resume from {newest}: {launch.stdout()[-500:]}"
    if step_of(newest_intact(run_dir / "checkpoints")) != step_of(newest) + 1:
        return f"the one-step resume did not commit step {step_of(newest) + 1}"
    resumed = logged(run_dir).get(step_of(newest) + 1)
    if killed_run is not None and (resumed is None or not same_step(resumed, killed_run)):
        return f"step {step_of(newest) + 1} resumed is not the killed run's: {resumed} against {killed_run}"
    return None


def storm(kills: int, seed: int, bound: float, work: Path) -> dict:
    rng = random.Random(seed)
    run_dir, rounds = work / "run", []
    newest = None
    for n in range(1, kills + 1):
        began = time.monotonic()
        resume = ["--resume"] if newest is not None else []
        launch = Launch.start([*resume, *STORM, f"train.run_dir={run_dir}"], work / "logs" / f"{n}-killed")
        try:
            target, phase = kill_at_random(launch, run_dir, rng, step_of(newest))
            stopped_in = launch.wait_gone(bound)
        finally:
            launch.end()
        problems = []
        if stopped_in is None:
            problems.append(f"still running {bound:g}s after the kill")
        if not lock_is_free(run_dir):
            problems.append("the run directory's lock is held")
        try:
            after = newest_intact(run_dir / "checkpoints")
        except Exception as exc:  # a damaged checkpoint: the claim under test fails
            problems.append(f"the newest checkpoint is damaged: {exc}")
            after = find_latest(run_dir / "checkpoints")
        if step_of(after) < step_of(newest):
            problems.append(f"went backwards: step {step_of(after)} after {step_of(newest)}")
        killed_run = logged(run_dir).get(step_of(after) + 1)
        if (trouble := one_step_resume(run_dir, work / "logs" / f"{n}-resume", after, bound, killed_run)) is not None:
            problems.append(trouble)
        rounds.append({
            "round": n, "target": target, "phase": phase, "stopped_in_s": stopped_in, "newest_before": step_of(newest),
            "newest_after_kill": step_of(after), "compared_to_killed_run": killed_run is not None, "problems": problems,
            "round_s": time.monotonic() - began,
        })
        newest = find_latest(run_dir / "checkpoints")
        stopped = "left running" if stopped_in is None else f"all ended in {stopped_in:.2f}s"
        print(
            f"round {n:3d}: SIGKILL {target:8s} during {phase:8s}: {stopped:20s} newest step {step_of(after):4d}, "
            f"resumed to {step_of(newest):4d}: {'ok' if not problems else 'FAILED: ' + '; '.join(problems)}", flush=True,
        )
    return summarize(rounds, seed, bound)


def summarize(rounds: list[dict], seed: int, bound: float) -> dict:
    times = [r["stopped_in_s"] for r in rounds if r["stopped_in_s"] is not None]
    return {
        "kills": len(rounds), "seed": seed, "bound_s": bound,
        "by_target": {t: sum(r["target"] == t for r in rounds) for t in TARGETS},
        "by_phase": {p: sum(r["phase"] == p for r in rounds) for p in ("start", "training", "flush")},
        "ok": sum(not r["problems"] for r in rounds),
        "failed": sum(bool(r["problems"]) for r in rounds),
        "left_running": sum(r["stopped_in_s"] is None for r in rounds),
        "went_backwards": sum(r["newest_after_kill"] < r["newest_before"] for r in rounds),
        "bit_exact_checks": sum(r["compared_to_killed_run"] for r in rounds),
        "stopped_in_s": {"median": statistics.median(times), "max": max(times)} if times else None,
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bound", type=float, default=60.0, help="seconds every process of a killed run has to end")
    parser.add_argument("--work", type=Path, default=None, help="where the run goes (default: a fresh temporary directory)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "kill_storm.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kill-storm-") as tmp:
        result = storm(args.kills, args.seed, args.bound, args.work or Path(tmp))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    times = result["stopped_in_s"] or {"median": float("nan"), "max": float("nan")}
    targets = ", ".join(f"{t} {n}" for t, n in result["by_target"].items())
    print(
        f"\n{result['kills']} SIGKILLs ({targets}; during start {result['by_phase']['start']}, training {result['by_phase']['training']}, "
        f"a checkpoint's flush {result['by_phase']['flush']}): {result['ok']} resumed from the newest committed checkpoint, "
        f"{result['failed']} failed, {result['left_running']} left processes running, {result['went_backwards']} went backwards, "
        f"{result['bit_exact_checks']} resumed steps compared with the killed run's (bit for bit); "
        f"every process ended {times['median']:.2f}s (median), {times['max']:.2f}s (max) after the kill\n-> {args.output}"
    )
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["failed"] == 0 else 1)
