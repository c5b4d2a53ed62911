"""Bubble fraction of each pipeline schedule ebb offers, read from the schedule's own action order.

    python bench/pipeline_bubbles.py [--pp 4] [--microbatches 8] [--virtual-stages 2]

Each schedule is built the way `parallel.pipeline.build_pipeline_schedule` builds it (the class
from `PIPELINE_SCHEDULES`, looped stage placement, `--virtual-stages` stages per rank for the
multi-stage schedules, one for gpipe and 1f1b) on stand-in stages over a fake process group of
`pp` ranks (torch's FakeStore: nothing is sent, nothing runs). Its `pipeline_order` holds, for
every rank, the list of actions F (forward), B (full backward), I (input-grad backward), W
(weight-grad backward) and None (idle slot).

Cost model, in units of one forward through a whole rank's layers: F = 1, B = 2, I = 1, W = 1
(I + W = B). With v virtual stages per rank each stage holds 1/v of the rank's layers, so its
actions cost 1/v of these. Communication costs nothing.

Timeline: simulated with dependencies, because the lists are not time-aligned. GPipe's and
1F1B's lose their idle Nones (torch's `_add_reduce_grad` drops them); the multi-stage lists pad
with Nones on a grid where every action takes one slot whatever its cost. So the Nones (and the
non-compute REDUCE_GRAD) are dropped and each rank runs its compute actions in list order, each
starting once the rank is free and its inputs exist: F(s, k) after F(s-1, k); B or I (s, k)
after F(s, k) and after the input gradient of (s+1, k); W(s, k) after I(s, k). Microbatches are
numbered by order of appearance per stage and kind, the order the schedules run them in: torch
2.13's Schedule1F1B lists the last rank's forwards as F1..Fm (no F0), a mislabelling of its IR
only, and the relabelled actions are counted in the output.

Bubble fraction of a rank: its idle time over the step's makespan (time 0 to the last action on
any rank; the ranks finish a step together, since ebb all-reduces the gradient norm over the pp
group). Every rank does the same work, 3 units per microbatch, so the fractions are equal; the
table gives their mean.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import _Action, _ComputationType
from torch.testing._internal.distributed.fake_pg import FakeStore

from parallel.pipeline import PIPELINE_SCHEDULES, runs_several_stages, stages_of_rank

Order = dict[int, list[_Action | None]]
Event = tuple[int, str, int]  # (stage, what it made available, microbatch)

COSTS = {  # per whole rank's layers; a virtual stage's action costs 1/v of it
    _ComputationType.FORWARD: 1.0,
    _ComputationType.FULL_BACKWARD: 2.0,
    _ComputationType.BACKWARD_INPUT: 1.0,
    _ComputationType.BACKWARD_WEIGHT: 1.0,
}
INPUT_GRAD_KINDS = frozenset({_ComputationType.FULL_BACKWARD, _ComputationType.BACKWARD_INPUT})


class Task(NamedTuple):
    stage: int
    kind: _ComputationType
    microbatch: int


class Span(NamedTuple):
    task: Task
    start: float
    end: float


# ---- the schedule's own order ---------------------------------------------------------------

@contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """Rank 0 of a default process group of `world_size` ranks on torch's fake backend."""
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised; run the bubble count in its own process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def schedule_order(schedule: str, pp: int, microbatches: int, virtual_stages: int) -> Order:
    """Every rank's action list of ebb's `schedule` (each rank computes all of them; rank 0 does here)."""
    n_stages = pp * virtual_stages
    with fake_process_group(pp):
        stages = [PipelineStage(nn.Identity(), s, n_stages, torch.device("cpu"))
                  for s in stages_of_rank(0, pp, virtual_stages)]
        stage_arg = stages if runs_several_stages(schedule) else stages[0]
        runner = PIPELINE_SCHEDULES[schedule](stage_arg, n_microbatches=microbatches, loss_fn=nn.functional.mse_loss)
        return runner.pipeline_order


def compute_actions(actions: list[_Action | None]) -> list[_Action]:
    """The F, B, I and W actions of a rank's list, in order (idle slots and REDUCE_GRAD dropped)."""
    return [a for a in actions if a is not None and a.computation_type in COSTS]


def numbered_by_appearance(actions: list[_Action]) -> list[Task]:
    """The actions as tasks, the k-th action of a kind on a stage being microbatch k."""
    seen: Counter[tuple[int, _ComputationType]] = Counter()
    tasks = []
    for action in actions:
        key = (action.stage_index, action.computation_type)
        tasks.append(Task(action.stage_index, action.computation_type, seen[key]))
        seen[key] += 1
    return tasks


def relabelled_count(actions: list[_Action], tasks: list[Task]) -> int:
    """How many actions the schedule labels with another microbatch than their order gives."""
    return sum(action.microbatch_index != task.microbatch for action, task in zip(actions, tasks))


# ---- the timeline ---------------------------------------------------------------------------

def produces(task: Task) -> Event:
    """What finishing `task` makes available: a stage's output, input gradient or weight gradient."""
    if task.kind == _ComputationType.FORWARD:
        return task.stage, "output", task.microbatch
    if task.kind in INPUT_GRAD_KINDS:
        return task.stage, "input_grad", task.microbatch
    return task.stage, "weight_grad", task.microbatch


def needs(task: Task, last_stage: int) -> list[Event]:
    """What `task` waits for: the previous stage's output (F), this stage's output and the next
    stage's input gradient (B, I), this stage's input gradient (W)."""
    s, k = task.stage, task.microbatch
    if task.kind == _ComputationType.FORWARD:
        return [(s - 1, "output", k)] if s > 0 else []
    if task.kind in INPUT_GRAD_KINDS:
        return [(s, "output", k)] + ([(s + 1, "input_grad", k)] if s < last_stage else [])
    return [(s, "input_grad", k)]


def replay(tasks: dict[int, list[Task]], virtual_stages: int) -> dict[int, list[Span]]:
    """Run each rank's tasks in order, each as soon as the rank is free and its inputs exist."""
    last_stage = max(task.stage for rank_tasks in tasks.values() for task in rank_tasks)
    done: dict[Event, float] = {}
    spans: dict[int, list[Span]] = {rank: [] for rank in tasks}
    progressed = True
    while progressed:
        progressed = False
        for rank, rank_tasks in tasks.items():
            for task in rank_tasks[len(spans[rank]):]:
                inputs = needs(task, last_stage)
                if any(event not in done for event in inputs):
                    break
                free_at = spans[rank][-1].end if spans[rank] else 0.0
                start = max([free_at, *(done[event] for event in inputs)])
                end = start + COSTS[task.kind] / virtual_stages
                done[produces(task)] = end
                spans[rank].append(Span(task, start, end))
                progressed = True
    stuck = {rank: rank_tasks[len(spans[rank])] for rank, rank_tasks in tasks.items() if len(spans[rank]) < len(rank_tasks)}
    if stuck:
        raise RuntimeError(f"the schedule deadlocks; ranks wait at {stuck}")
    return spans


def bubble_fractions(spans: dict[int, list[Span]]) -> tuple[float, dict[int, float]]:
    """The makespan, and each rank's idle time over it."""
    makespan = max(rank_spans[-1].end for rank_spans in spans.values())
    busy = {rank: sum(span.end - span.start for span in rank_spans) for rank, rank_spans in spans.items()}
    return makespan, {rank: 1.0 - busy[rank] / makespan for rank in spans}


def textbook_bubble(schedule: str, pp: int, microbatches: int, virtual_stages: int) -> tuple[float | None, str]:
    """The published bubble fraction: (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(v m+p-1) for
    interleaved 1F1B (Narayanan et al. 2021); none for the zero-bubble schedule."""
    if schedule in ("gpipe", "1f1b"):
        return (pp - 1) / (microbatches + pp - 1), "(p-1)/(m+p-1)"
    if schedule == "interleaved_1f1b":
        return (pp - 1) / (virtual_stages * microbatches + pp - 1), "(p-1)/(v*m+p-1)"
    return None, ""


def measure(schedule: str, pp: int, microbatches: int, virtual_stages: int) -> dict:
    """Bubble fraction of one schedule from its action order, with the textbook figure."""
    order = schedule_order(schedule, pp, microbatches, virtual_stages)
    actions = {rank: compute_actions(rank_actions) for rank, rank_actions in order.items()}
    tasks = {rank: numbered_by_appearance(rank_actions) for rank, rank_actions in actions.items()}
    makespan, per_rank = bubble_fractions(replay(tasks, virtual_stages))
    textbook, formula = textbook_bubble(schedule, pp, microbatches, virtual_stages)
    return {
        "schedule_class": PIPELINE_SCHEDULES[schedule].__name__,
        "virtual_stages": virtual_stages,
        "bubble_fraction": sum(per_rank.values()) / len(per_rank),
        "bubble_fraction_per_rank": per_rank,
        "makespan": makespan,
        "textbook": textbook,
        "textbook_formula": formula,
        "relabelled_actions": sum(relabelled_count(actions[r], tasks[r]) for r in actions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--virtual-stages", type=int, default=2, help="stages per rank of interleaved_1f1b and zero_bubble")
    parser.add_argument("--out", default="bench/results/pipeline_bubbles.json")
    args = parser.parse_args()

    rows = {name: measure(name, args.pp, args.microbatches, args.virtual_stages if runs_several_stages(name) else 1)
            for name in PIPELINE_SCHEDULES}

    print(f"pipeline bubbles pp={args.pp} microbatches={args.microbatches}; "
          f"cost F=1 B=2 I=1 W=1 (1/v per virtual stage); timeline simulated with dependencies")
    print(f"{'schedule':<18}{'virtual':>8}{'bubble':>9}{'textbook':>10}  {'formula':<17}{'makespan':>9}")
    for name, row in rows.items():
        textbook = "-" if row["textbook"] is None else f"{row['textbook']:.4f}"
        print(f"{name:<18}{row['virtual_stages']:>8}{row['bubble_fraction']:>9.4f}{textbook:>10}  "
              f"{row['textbook_formula'] or '-':<17}{row['makespan']:>9.2f}")
    for name, row in rows.items():
        if row["relabelled_actions"]:
            print(f"note: {row['schedule_class']} labels {row['relabelled_actions']} actions with another microbatch "
                  f"than their order on the stage; they were numbered by order")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"pp": args.pp, "microbatches": args.microbatches, "torch": torch.__version__,
              "cost_model": {"F": 1, "B": 2, "I": 1, "W": 1, "virtual_stage_factor": "1/v"},
              "timeline": "simulated with dependencies from each rank's compute actions in list order",
              "results": rows}
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
