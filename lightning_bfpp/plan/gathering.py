"""Where a schedule gathers and frees the sharded parameters of each stage (ZeRO-2/3), as schedule actions.

A *run* is a maximal sequence of consecutive computes (forwards or backwards) of one stage on one rank. A stage's
parameters must be gathered during each of its runs. Breadth-first schedules have two runs per stage (all the
forwards, then all the backwards; one for the last stage), whatever the number of micro-batches; depth-first
schedules have one run per stage and group of micro-batches, so they gather more often.

- ``GATHER(s)`` starts the all-gather of stage ``s`` right before the first compute of the *previous* run, so the
  transfer overlaps that run's compute (prefetch of one run ahead); the compute of ``s`` waits for it.
- ``RESHARD(s)`` frees the gathered parameters right after the run (before the next run's first compute), or, when
  ``reshard_after_forward`` is False (ZeRO-2: gathered once per step), after the last run of ``s`` only.

This module is pure Python, like :mod:`lightning_bfpp.plan.schedule`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from lightning_bfpp.plan.schedule import Action, ActionKind, Schedule, ScheduleError

_COMPUTE = (ActionKind.FORWARD, ActionKind.BACKWARD)


def compute_runs(actions: tuple[Action, ...]) -> list[tuple[int, int, int]]:
    """``(stage, first, last)`` positions in ``actions`` of each run of consecutive computes of one stage."""
    runs: list[tuple[int, int, int]] = []
    for i, action in enumerate(actions):
        if action.kind not in _COMPUTE:
            continue
        if runs and runs[-1][0] == action.stage:
            runs[-1] = (action.stage, runs[-1][1], i)
        else:
            runs.append((action.stage, i, i))
    return runs


def _with_gathering(actions: tuple[Action, ...], reshard_after_forward: bool) -> tuple[Action, ...]:
    runs = compute_runs(actions)
    last_run = {stage: k for k, (stage, _, _) in enumerate(runs)}
    before: dict[int, list[Action]] = {}  # inserted before position i
    gathered: set[int] = set()
    for k, (stage, first, _) in enumerate(runs):
        if stage not in gathered:  # gather it one run ahead (or at the start for the first run)
            at = runs[k - 1][1] if k > 0 else first
            before.setdefault(at, []).append(Action(ActionKind.GATHER, stage))
            gathered.add(stage)
        if reshard_after_forward or last_run[stage] == k:
            # free it before the next run's first compute (after this run's sends and reduction)
            end = runs[k + 1][1] if k + 1 < len(runs) else len(actions)
            before.setdefault(end, []).insert(0, Action(ActionKind.RESHARD, stage))
            gathered.discard(stage)
    out: list[Action] = []
    for i, action in enumerate(actions):
        out += before.get(i, [])
        out.append(action)
    out += before.get(len(actions), [])
    return tuple(out)


def add_parameter_gathering(schedule: Schedule, *, reshard_after_forward: bool = True) -> Schedule:
    """``schedule`` with GATHER/RESHARD actions for sharded parameters (see the module docstring); validated."""
    ranks = tuple(_with_gathering(actions, reshard_after_forward) for actions in schedule.actions)
    gathered = replace(schedule, actions=ranks)
    validate_gathering(gathered)
    return gathered


def validate_gathering(schedule: Schedule) -> None:
    """Checks that every compute of a stage runs while its parameters are gathered, and that every gather is freed
    by the end of the step."""
    problems = []
    for rank, actions in enumerate(schedule.actions):
        gathered: set[int] = set()
        for i, action in enumerate(actions):
            at = f"rank {rank} position {i} ({action})"
            if action.kind is ActionKind.GATHER:
                if action.stage in gathered:
                    problems.append(f"{at}: stage {action.stage} is already gathered")
                gathered.add(action.stage)
            elif action.kind is ActionKind.RESHARD:
                if action.stage not in gathered:
                    problems.append(f"{at}: stage {action.stage} is not gathered")
                gathered.discard(action.stage)
            elif action.kind in _COMPUTE and action.stage not in gathered:
                problems.append(f"{at}: runs without its parameters gathered")
        if gathered:
            problems.append(f"rank {rank}: stages {sorted(gathered)} are still gathered at the end of the step")
    if problems:
        raise ScheduleError("invalid parameter gathering:\n" + "\n".join(f"  - {p}" for p in problems[:12]))


def gathers_per_stage(schedule: Schedule) -> Counter[int]:
    """How many times the schedule gathers each stage's parameters in one step."""
    return Counter(a.stage for actions in schedule.actions for a in actions if a.kind is ActionKind.GATHER)
