"""Where a schedule computes the batched weight gradients of each stage, as ``BACKWARD_WEIGHT`` actions.

With ``weight_gradients="batched"`` (:mod:`lightning_bfpp.run.weight_grad`) a backward computes only the input gradients
of its stage's Linear layers and keeps the operands of their weight gradients. ``BACKWARD_WEIGHT(s)`` (``W<s>``)
computes the weight gradients of every backward of stage ``s`` since its previous ``W<s>``, one product per Linear.

A *run of backwards* is a maximal sequence of backwards of one stage on one rank: it ends at the rank's next action
that is neither a backward of that stage nor a transfer. :func:`add_weight_flush` puts ``W<s>`` right there, so
the transfers of the run's last backward (the send of its input gradient) are issued first, and the run's weight
gradients are in ``.grad`` before the stage's ``REDUCE_GRAD`` and the end of the step. Breadth-first has one run
per local stage (and group of micro-batches); depth-first has runs of one or a few backwards.

Pure Python, like :mod:`lightning_bfpp.plan.schedule`.
"""

from __future__ import annotations

from dataclasses import replace

from lightning_bfpp.plan.schedule import COMMUNICATION_KINDS, GROUP_END, Action, ActionKind, Schedule, ScheduleError

_B, _W, _RD = ActionKind.BACKWARD, ActionKind.BACKWARD_WEIGHT, ActionKind.REDUCE_GRAD
_TRANSFERS = COMMUNICATION_KINDS | {ActionKind.GROUP_END}


def _with_flushes(actions: tuple[Action, ...]) -> tuple[Action, ...]:
    out: list[Action] = []
    pending: int | None = None  # the stage whose run of backwards has not been flushed yet
    for action in (a for a in actions if a.kind is not _W):
        if pending is not None and action.kind not in _TRANSFERS and action != Action(_B, pending, action.micro_batch):
            out.append(Action(_W, pending))
            pending = None
        if action.kind is _B:
            pending = action.stage
        out.append(action)
    if pending is not None:
        out.append(Action(_W, pending))
    return tuple(out)


def add_weight_flush(schedule: Schedule) -> Schedule:
    """``schedule`` with a ``BACKWARD_WEIGHT`` action after each run of backwards (see the module docstring);
    validated. Forward-only schedules have no backward and come back unchanged."""
    flushed = replace(schedule, actions=tuple(_with_flushes(actions) for actions in schedule.actions))
    validate_weight_flush(flushed)
    return flushed


def validate_weight_flush(schedule: Schedule) -> None:
    """Checks that every backward of a stage is followed by a ``BACKWARD_WEIGHT`` of that stage before the stage
    computes again other than by a backward, before the rank computes another stage, before the stage's
    ``REDUCE_GRAD`` and before the end of the step; and that every ``BACKWARD_WEIGHT`` has backwards to flush."""
    problems = []
    for rank, actions in enumerate(schedule.actions):
        pending: dict[int, tuple[int, Action]] = {}  # stage -> (position, action) of its last unflushed backward
        for i, action in enumerate(actions):
            at = f"rank {rank} position {i} ({action})"
            if action == GROUP_END or action.kind in _TRANSFERS:
                continue
            if action.kind is _W:
                if action.micro_batch != -1 or schedule.rank_of(action.stage) != rank:
                    problems.append(f"{at}: must name a stage of rank {rank} and micro_batch=-1")
                elif action.stage not in pending:
                    problems.append(f"{at}: stage {action.stage} has no backward to flush since its previous flush")
                pending.pop(action.stage, None)
                continue
            for stage, (position, backward) in list(pending.items()):
                if action.kind is _B and action.stage == stage:
                    continue
                why = "its reduction would miss them" if action == Action(_RD, stage) else "the run of backwards ended"
                problems.append(
                    f"rank {rank}: stage {stage} needs a {_W.name} ({_W.value}{stage}) between its backward "
                    f"{backward} (position {position}) and {action} (position {i}): {why}"
                )
                del pending[stage]
            if action.kind is _B:
                pending[action.stage] = (i, action)
        problems += [
            f"rank {rank}: stage {stage} needs a {_W.name} ({_W.value}{stage}) after its backward {backward} "
            f"(position {position}): the step ends without its weight gradients"
            for stage, (position, backward) in pending.items()
        ]
    if problems:
        raise ScheduleError(
            "invalid weight-gradient flushes (weight_gradients='batched'):\n"
            + "\n".join(f"  - {p}" for p in problems[:12])
            + "\nschedule:\n"
            + schedule.format()
        )
