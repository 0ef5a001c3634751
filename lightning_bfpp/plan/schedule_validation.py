"""Validation of a built :class:`~lightning_bfpp.plan.schedule_actions.Schedule`: every needed action once, on its rank,
in a legal local order, and free of deadlock when all ranks run it (:func:`simulate_order`)."""

from __future__ import annotations

from collections import Counter

from lightning_bfpp.plan.schedule_actions import (
    _B,
    _F,
    _RA,
    _RD,
    _RG,
    _SA,
    _SG,
    GROUP_END,
    PASS_KINDS,
    Action,
    ActionKind,
    Schedule,
    ScheduleError,
    _first_of,
    _recvs_for,
    _sends_for,
)

_MAX_PROBLEMS = 12


def _fail(schedule: Schedule, problems: list[str]) -> ScheduleError:
    shown = problems[:_MAX_PROBLEMS]
    if len(problems) > _MAX_PROBLEMS:
        shown.append(f"... and {len(problems) - _MAX_PROBLEMS} more")
    return ScheduleError(
        f"invalid {schedule.name!r} schedule (pipeline_size={schedule.pipeline_size}, stages_per_rank="
        f"{schedule.stages_per_rank}, num_micro_batches={schedule.num_micro_batches}, forward_only="
        f"{schedule.forward_only}):\n" + "\n".join(f"  - {p}" for p in shown) + "\nschedule:\n" + schedule.format()
    )


def _required(schedule: Schedule) -> set[Action]:
    num_stages = schedule.num_stages
    computes = [Action(_F, s, m) for s in range(num_stages) for m in range(schedule.num_micro_batches)]
    if not schedule.forward_only:
        computes += [Action(_B, a.stage, a.micro_batch) for a in computes]
    required = set(computes)
    for action in computes:
        required.update(_recvs_for(action, num_stages, schedule.pipeline_size))
        required.update(_sends_for(action, num_stages, schedule.pipeline_size))
    if not schedule.forward_only:
        required.update(Action(_RD, s) for s in range(num_stages))
    return required


def _structure_problems(schedule: Schedule) -> list[str]:
    if len(schedule.actions) != schedule.pipeline_size:
        return [f"the schedule has {len(schedule.actions)} rank lists, expected pipeline_size={schedule.pipeline_size}"]
    problems, where = [], {}
    counts: Counter[Action] = Counter()
    for rank, actions in enumerate(schedule.actions):
        for i, action in enumerate(actions):
            at = f"rank {rank} position {i}"
            if not isinstance(action, Action) or not isinstance(action.kind, ActionKind):
                problems.append(f"{at}: {action!r} is not an Action")
                continue
            if action.kind in PASS_KINDS:
                continue  # optional; checked by gathering.validate_gathering or weight_flush.validate_weight_flush
            if action == GROUP_END:
                continue
            if not 0 <= action.stage < schedule.num_stages:
                problems.append(f"{at}: {action} names stage {action.stage}, outside 0..{schedule.num_stages - 1}")
                continue
            if action.kind is _RD and action.micro_batch != -1:
                problems.append(f"{at}: {action} must have micro_batch=-1")
                continue
            if action.kind is not _RD and not 0 <= action.micro_batch < schedule.num_micro_batches:
                problems.append(
                    f"{at}: {action} names micro-batch {action.micro_batch}, outside "
                    f"0..{schedule.num_micro_batches - 1}"
                )
                continue
            if schedule.rank_of(action.stage) != rank:
                problems.append(
                    f"{at}: {action} is on the wrong rank; stage {action.stage} lives on rank "
                    f"{schedule.rank_of(action.stage)}"
                )
                continue
            counts[action] += 1
            where.setdefault(action, []).append(at)
    required = _required(schedule)
    for action, count in counts.items():
        if count > 1:
            problems.append(f"{action} appears {count} times ({', '.join(where[action])}), expected once")
        if action not in required:
            problems.append(f"{where[action][0]}: {action} is not needed ({_why_not_needed(schedule, action)})")
    missing = sorted(required - set(counts), key=lambda a: (a.stage, a.micro_batch, a.kind.value))
    problems += [f"{a} is missing (expected on rank {schedule.rank_of(a.stage)})" for a in missing]
    return problems


def _why_not_needed(schedule: Schedule, action: Action) -> str:
    if schedule.forward_only and action.kind in (_B, _RG, _SG, _RD):
        return "forward_only schedules have no backward"
    if schedule.pipeline_size == 1:
        return "with pipeline_size=1 all stages are on rank 0 and tensors are handed over without send/recv"
    return "the first stage has no input from another stage and the last stage no output to send"


def _order_problems(schedule: Schedule) -> list[str]:
    position = {a: i for actions in schedule.actions for i, a in enumerate(actions)}
    rules = [  # (earlier, later, why), checked for every stage and micro-batch
        (_RA, _F, "the forward needs the received input"),
        (_F, _SA, "the send needs the forward's output"),
        (_F, _B, "the backward needs the forward"),
        (_RG, _B, "the backward needs the received gradient"),
        (_F, _RG, "the gradient's buffers take the shapes of the forward's outputs"),
        (_B, _SG, "the send needs the backward's input gradient"),
    ]
    problems = []
    for s in range(schedule.num_stages):
        at = f"rank {schedule.rank_of(s)}"
        for m in range(schedule.num_micro_batches):
            for earlier, later, why in rules:
                first, second = Action(earlier, s, m), Action(later, s, m)
                if first in position and second in position and position[first] > position[second]:
                    problems.append(
                        f"{at}: {first} (position {position[first]}) must come before {second} "
                        f"(position {position[second]}): {why}"
                    )
            backward, reduce = Action(_B, s, m), Action(_RD, s)
            if backward in position and reduce in position and position[backward] > position[reduce]:
                problems.append(
                    f"{at}: {reduce} (position {position[reduce]}) must come after {backward} "
                    f"(position {position[backward]}): the reduction needs every backward of stage {s}"
                )
    return problems


def validate_schedule(schedule: Schedule) -> None:
    """Checks structure, local order and freedom from deadlock; raises :class:`ScheduleError` with the reason."""
    problems = _structure_problems(schedule)
    if not problems:
        problems = _order_problems(schedule)
    if problems:
        raise _fail(schedule, problems)
    simulate_order(schedule)


def simulate_order(schedule: Schedule) -> list[tuple[int, Action]]:
    """Executes all ranks round-robin and returns the global order ``(rank, action)``; raises on deadlock.

    Sends and receive-posts never block. FORWARD(s, m) waits for SEND_ACT(s-1, m) (or FORWARD(s-1, m) on the same
    rank), and the first FORWARD of a stage also for the first SEND_ACT of its input boundary, which carries the
    shapes. BACKWARD(s, m) waits for SEND_GRAD(s+1, m) (or BACKWARD(s+1, m) on the same rank). The first RECV_ACT
    of a stage waits for the shapes, which the executor reads before it posts the receive.
    """
    all_actions = [a for actions in schedule.actions for a in actions]
    first_send, first_forward = _first_of(all_actions, _SA), set(_first_of(all_actions, _F).values())
    first_recv = set(_first_of(all_actions, _RA).values())
    last = schedule.num_stages - 1

    def needs(action: Action) -> list[Action]:
        s, m = action.stage, action.micro_batch
        local = schedule.pipeline_size == 1
        if action in first_recv and s - 1 in first_send:
            return [first_send[s - 1]]
        if action.kind is _F and s > 0:
            deps = [Action(_F, s - 1, m)] if local else [Action(_SA, s - 1, m)]
            if action in first_forward and s - 1 in first_send and first_send[s - 1] not in deps:
                deps.append(first_send[s - 1])
            return deps
        if action.kind is _B and s < last:
            return [Action(_B, s + 1, m)] if local else [Action(_SG, s + 1, m)]
        return []

    done: set[Action] = set()
    order: list[tuple[int, Action]] = []
    pointers = [0] * len(schedule.actions)
    while True:
        progressed = False
        for rank, actions in enumerate(schedule.actions):
            while pointers[rank] < len(actions) and all(d in done for d in needs(actions[pointers[rank]])):
                done.add(actions[pointers[rank]])
                order.append((rank, actions[pointers[rank]]))
                pointers[rank] += 1
                progressed = True
        if all(p == len(a) for p, a in zip(pointers, schedule.actions, strict=True)):
            return order
        if not progressed:
            break
    owner = {a: r for r, actions in enumerate(schedule.actions) for a in actions}
    problems = []
    for rank, actions in enumerate(schedule.actions):
        if pointers[rank] < len(actions):
            blocked = actions[pointers[rank]]
            waits = ", ".join(
                f"{d} on rank {owner[d]}" if d in owner else f"{d} (not in the schedule)"
                for d in needs(blocked)
                if d not in done
            )
            problems.append(f"rank {rank} is blocked at {blocked} (position {pointers[rank]}), waiting for {waits}")
    raise _fail(
        schedule, [f"deadlock after {len(order)} of {len(all_actions)} actions: no rank can make progress", *problems]
    )
