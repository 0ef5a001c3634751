"""Pipeline schedules as data: the ordered actions every pipeline rank runs for one training (or evaluation) step.

There are ``S = pipeline_size * stages_per_rank`` stages; stage ``s`` lives on pipeline rank ``s % pipeline_size``
(looped placement). Every rank builds the same global :class:`Schedule` and walks ``schedule.actions[rank]``.
This module holds the generators of the built-in schedules and :func:`build_schedule`; the actions and the
:class:`Schedule` type are in :mod:`lightning_bfpp.plan.schedule_actions`, the checks in
:mod:`lightning_bfpp.plan.schedule_validation`, and both are importable from here. Pure Python on purpose, so
schedules can be built, printed and checked without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from lightning_bfpp.plan.schedule_actions import (
    _B,
    _F,
    _RA,
    _RD,
    _RG,
    _SA,
    _SG,
    COMMUNICATION_KINDS,
    GROUP_END,
    PARAMETER_KINDS,
    PASS_KINDS,
    Action,
    ActionKind,
    Schedule,
    ScheduleError,
    _first_of,
    _matching_recv,
    _recvs_for,
    _sends_for,
    communication_groups,
    stage_rank,
)
from lightning_bfpp.plan.schedule_validation import _fail as _fail
from lightning_bfpp.plan.schedule_validation import simulate_order, validate_schedule

__all__ = [  # the vocabulary and the validation live in their own modules; this module keeps their public names
    "COMMUNICATION_KINDS",
    "GROUP_END",
    "PARAMETER_KINDS",
    "PASS_KINDS",
    "SCHEDULES",
    "Action",
    "ActionKind",
    "Schedule",
    "ScheduleError",
    "breadth_first",
    "build_schedule",
    "check_micro_batch_groups",
    "communication_groups",
    "depth_first",
    "gpipe",
    "one_f_one_b",
    "simulate_order",
    "stage_rank",
    "validate_schedule",
]


# ---------------------------------------------------------------------------------------------------------------
# generators: each decides the order of FORWARD/BACKWARD per rank; _assemble adds communication and REDUCE_GRAD.


def _check_sizes(pipeline_size: int, stages_per_rank: int, num_micro_batches: int) -> None:
    for name, value in (
        ("pipeline_size", pipeline_size),
        ("stages_per_rank", stages_per_rank),
        ("num_micro_batches", num_micro_batches),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{name} must be an integer >= 1, got {value!r}")


def _assemble(name: str, sizes: tuple[int, int, int], forward_only: bool, computes: list[list[Action]]) -> Schedule:
    """Adds sends, receives and REDUCE_GRAD around each rank's compute order, in lock-step.

    The ranks run their computes in time steps, each compute as soon as its input was sent in an earlier step. After
    the compute of a step (or nothing, when the rank waits) comes one communication group (see
    :func:`communication_groups`): the compute's sends and the receives of every message sent to the rank in that
    step. So every message is received in the group of the step it is sent in, and between any two ranks both sides
    issue the same messages in the same order, which NCCL needs: it runs the transfers between two ranks in issue
    order, a receive holding the stream until its data arrives and a send until the peer's receive runs (see
    :mod:`lightning_bfpp.plan.stream_order`). REDUCE_GRAD(s) follows the group of the last BACKWARD of s. Breadth-first
    and GPipe then post their receive-only groups earlier (:func:`_post_receives_early`).
    """
    pipeline_size, stages_per_rank, num_micro_batches = sizes
    num_stages = pipeline_size * stages_per_rank
    last_backward = [{a.stage: a for a in compute if a.kind is _B} for compute in computes]
    ranks: list[list[Action]] = [[] for _ in computes]
    pointers, sent = [0] * len(computes), set()
    while any(i < len(compute) for i, compute in zip(pointers, computes, strict=True)):
        ran = []
        for rank, compute in enumerate(computes):
            if pointers[rank] < len(compute):
                action = compute[pointers[rank]]
                if all(recv in sent for recv in _recvs_for(action, num_stages, pipeline_size)):
                    ran.append(action)
                    pointers[rank] += 1
        if not ran:
            stuck = ", ".join(
                f"rank {r}: {c[i]}" for r, (i, c) in enumerate(zip(pointers, computes, strict=True)) if c[i:]
            )
            raise ScheduleError(f"{name}: no compute can run, each waits for an input never sent ({stuck})")
        arriving: list[Action] = []
        for action in ran:
            sends = _sends_for(action, num_stages, pipeline_size)
            ranks[stage_rank(action.stage, pipeline_size)] += [action, *sends]
            arriving += [_matching_recv(send) for send in sends]
        for recv in sorted(arriving, key=lambda a: (a.kind.value, a.stage, a.micro_batch)):
            ranks[stage_rank(recv.stage, pipeline_size)].append(recv)
        sent.update(arriving)
        for action in ran:
            if action.kind is _B and last_backward[stage_rank(action.stage, pipeline_size)][action.stage] == action:
                ranks[stage_rank(action.stage, pipeline_size)].append(Action(_RD, action.stage))
    actions = tuple(tuple(r) for r in ranks)
    return Schedule(name, pipeline_size, stages_per_rank, num_micro_batches, forward_only, actions)


def _post_receives_early(schedule: Schedule) -> Schedule:
    """``schedule`` (in lock-step) with each group of receives only moved back past the computes before it, up to the
    rank's previous communication group, and kept as a group of its own (GROUP_END markers): the transfer then
    overlaps those computes. The order of the transfers on every rank is unchanged, and no receive moves past a send
    of its rank, which could otherwise wait behind it on NCCL's stream. A group that holds a boundary's first input
    stays (the rank reads the boundary's shapes on the host there), and a RECV_GRAD stays after its FORWARD."""
    first_input = set(_first_of((a for actions in schedule.actions for a in actions), _RA).values())
    ranks = []
    for actions in schedule.actions:
        out, shift = list(actions), 0
        for positions in communication_groups(actions):  # a move shifts the later groups by its GROUP_END, if any
            group = [i + shift for i in positions]
            moved = [out[i] for i in group]
            if any(a.kind in (_SA, _SG) or a in first_input for a in moved):
                continue
            forwards = {Action(_F, a.stage, a.micro_batch) for a in moved if a.kind is _RG}
            to = group[0]
            while to > 0 and out[to - 1].kind not in COMMUNICATION_KINDS and out[to - 1] not in forwards:
                to -= 1
            while out[to].kind is _RD:  # a reduction right after its stage's last group is started first
                to += 1
            if any(out[i].kind in (_F, _B) for i in range(to, group[0])):
                del out[group[0] : group[-1] + 1]
                split = to > 0 and out[to - 1].kind in COMMUNICATION_KINDS
                out[to:to] = [GROUP_END, *moved] if split else moved
                shift += split
        ranks.append(tuple(out))
    return replace(schedule, actions=tuple(ranks))


def _with_early_receives(schedule: Schedule) -> Schedule:
    """``schedule``'s computes with the communication order earlier versions used for depth_first and 1f1b: each
    receive posted one compute early (before the compute that precedes its consumer, but a RECV_GRAD not before its
    FORWARD), each send right after its compute. Issued as single operations this order deadlocks on NCCL for 1F1B
    and interleaved 1F1B; kept so that tests can show the NCCL stream check rejecting it."""
    num_stages, pipeline_size = schedule.num_stages, schedule.pipeline_size
    ranks = []
    for actions in schedule.actions:
        compute = [a for a in actions if a.kind in (_F, _B)]
        last_backward = {a.stage: i for i, a in enumerate(compute) if a.kind is _B}
        out: list[Action] = _recvs_for(compute[0], num_stages, pipeline_size) if compute else []
        for i, action in enumerate(compute):
            late: list[Action] = []
            if i + 1 < len(compute):
                after = compute[i + 1]
                if after.kind is _B and (after.stage, after.micro_batch) == (action.stage, action.micro_batch):
                    late = _recvs_for(after, num_stages, pipeline_size)  # must follow its own forward
                else:
                    out += _recvs_for(after, num_stages, pipeline_size)
            out.append(action)
            out += _sends_for(action, num_stages, pipeline_size)
            if action.kind is _B and last_backward[action.stage] == i:
                out.append(Action(_RD, action.stage))
            out += late
        ranks.append(tuple(out))
    return replace(schedule, actions=tuple(ranks))


def _breadth_first_computes(
    pipeline_size: int, stages_per_rank: int, num_micro_batches: int, forward_only: bool, group_size: int | None = None
) -> list[list[Action]]:
    """Breadth-first within groups of ``group_size`` consecutive micro-batches (all ``M`` by default), the groups one
    after another (depth-first), as Fast-LLM's breadth_first_micro_batches x depth_first_micro_batches."""
    size = group_size or num_micro_batches
    computes = []
    for rank in range(pipeline_size):
        stages = range(rank, pipeline_size * stages_per_rank, pipeline_size)
        order = []
        for group in (range(g, g + size) for g in range(0, num_micro_batches, size)):
            order += [Action(_F, s, m) for s in stages for m in group]
            if not forward_only:
                # Backward runs the micro-batches in the same order as the forward: the last stage starts with the
                # group's first micro-batch right after its last forward, and gradients then stream upstream in the
                # order they are produced, so every boundary carries the same micro-batch first in both directions.
                order += [Action(_B, s, m) for s in reversed(stages) for m in group]
        computes.append(order)
    return computes


def check_micro_batch_groups(schedule: str, num_micro_batches: int | None, group_size: int | None) -> None:
    """Checks ``breadth_first_micro_batches`` (the group size of memory-bounded breadth-first): ``None``, or a divisor
    of ``num_micro_batches`` (when known) with ``schedule='breadth_first'``."""
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ScheduleError(f"breadth_first_micro_batches must be an integer >= 1 or None, got {group_size!r}")
    if schedule != "breadth_first":
        raise ScheduleError(
            f"breadth_first_micro_batches={group_size} groups the micro-batches of schedule='breadth_first', not of "
            f"schedule={schedule!r}: remove it, or use schedule='breadth_first'"
        )
    if num_micro_batches is not None and num_micro_batches % group_size:
        valid = ", ".join(str(d) for d in range(1, num_micro_batches + 1) if num_micro_batches % d == 0)
        raise ScheduleError(
            f"breadth_first_micro_batches={group_size} must divide the number of micro-batches ({num_micro_batches}), "
            f"which run in groups of that size: use one of {valid}, or change the number of micro-batches"
        )


def breadth_first(
    pipeline_size: int,
    stages_per_rank: int,
    num_micro_batches: int,
    *,
    forward_only: bool = False,
    breadth_first_micro_batches: int | None = None,
) -> Schedule:
    """Looped breadth-first: each rank runs all micro-batches through one local stage before the next one.

    With ``breadth_first_micro_batches=G`` (a divisor of ``M``), memory-bounded: micro-batches ``0..G-1`` go forward and
    backward through every stage breadth-first, then ``G..2G-1``, and so on; each rank keeps the activations of at most
    ``G`` micro-batches per local stage instead of ``M``, and runs each stage ``M / G`` times as often.
    """
    _check_sizes(pipeline_size, stages_per_rank, num_micro_batches)
    check_micro_batch_groups("breadth_first", num_micro_batches, breadth_first_micro_batches)
    sizes = (pipeline_size, stages_per_rank, num_micro_batches)
    computes = _breadth_first_computes(*sizes, forward_only, breadth_first_micro_batches)
    return _post_receives_early(_assemble("breadth_first", sizes, forward_only, computes))


def gpipe(pipeline_size: int, stages_per_rank: int, num_micro_batches: int, *, forward_only: bool = False) -> Schedule:
    """GPipe: one stage per rank, all forwards then all backwards."""
    _check_sizes(pipeline_size, stages_per_rank, num_micro_batches)
    if stages_per_rank != 1:
        raise ScheduleError(
            "gpipe places one stage per rank (stages_per_rank=1); use schedule='breadth_first' for "
            f"looped stages (got stages_per_rank={stages_per_rank})"
        )
    sizes = (pipeline_size, stages_per_rank, num_micro_batches)
    return _post_receives_early(_assemble("gpipe", sizes, forward_only, _breadth_first_computes(*sizes, forward_only)))


def _interleaved_computes(pipeline_size: int, stages_per_rank: int, num_micro_batches: int) -> list[list[Action]]:
    """Megatron-style interleaved 1F1B; with one stage per rank this is the classic 1F1B."""
    p, chunks, total = pipeline_size, stages_per_rank, num_micro_batches * stages_per_rank

    def virtual(k: int, rank: int, backward: bool) -> Action:
        # Micro-batches go in groups of P through the local chunks: k -> (chunk, micro-batch).
        group, within = divmod(k, p * chunks)
        chunk = within // p
        if backward:
            chunk = chunks - 1 - chunk
        return Action(_B if backward else _F, chunk * p + rank, group * p + within % p)

    computes = []
    for rank in range(p):
        # Warm-up: the last rank runs (chunks-1)*P forwards before its first backward and each rank further up
        # more. Classic 1F1B (one chunk) adds one per hop; with several chunks we add two per hop like Megatron-LM,
        # which hides the point-to-point latency in the steady state at the cost of a few more live activations.
        hops = (p - 1 - rank) * (1 if chunks == 1 else 2)
        warmup = min((chunks - 1) * p + hops, total)
        order = [virtual(k, rank, False) for k in range(warmup)]
        for k in range(total - warmup):
            order += [virtual(k + warmup, rank, False), virtual(k, rank, True)]
        order += [virtual(k, rank, True) for k in range(total - warmup, total)]
        computes.append(order)
    return computes


def depth_first(
    pipeline_size: int, stages_per_rank: int, num_micro_batches: int, *, forward_only: bool = False
) -> Schedule:
    """Interleaved 1F1B (virtual pipeline): warm-up, steady one-forward-one-backward, cool-down.

    With stages_per_rank > 1 it needs num_micro_batches % pipeline_size == 0 (not when forward_only, which is
    breadth-first like every forward-only schedule); with one stage per rank it is the classic 1F1B.
    """
    _check_sizes(pipeline_size, stages_per_rank, num_micro_batches)
    sizes = (pipeline_size, stages_per_rank, num_micro_batches)
    if forward_only:  # breadth-first, with its order of receives
        return _post_receives_early(_assemble("depth_first", sizes, True, _breadth_first_computes(*sizes, True)))
    if stages_per_rank > 1 and num_micro_batches % pipeline_size:
        lower = num_micro_batches // pipeline_size * pipeline_size
        valid = " or ".join(str(m) for m in (lower, lower + pipeline_size) if m > 0)
        raise ScheduleError(
            f"depth_first with stages_per_rank={stages_per_rank} needs num_micro_batches to be a multiple of "
            f"pipeline_size={pipeline_size}, got {num_micro_batches}; use num_micro_batches={valid}, or "
            "schedule='breadth_first', which accepts any number of micro-batches"
        )
    return _assemble("depth_first", sizes, False, _interleaved_computes(*sizes))


def one_f_one_b(
    pipeline_size: int, stages_per_rank: int, num_micro_batches: int, *, forward_only: bool = False
) -> Schedule:
    """Classic 1F1B: rank r runs min(P - r - 1, M) warm-up forwards, then alternates forward and backward."""
    _check_sizes(pipeline_size, stages_per_rank, num_micro_batches)
    if stages_per_rank != 1:
        raise ScheduleError(
            "1f1b places one stage per rank (stages_per_rank=1); use schedule='depth_first' for "
            f"interleaved 1F1B with looped stages (got stages_per_rank={stages_per_rank})"
        )
    return replace(depth_first(pipeline_size, 1, num_micro_batches, forward_only=forward_only), name="1f1b")


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "breadth_first": breadth_first,
    "depth_first": depth_first,
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
}


def build_schedule(
    name: str,
    pipeline_size: int,
    stages_per_rank: int,
    num_micro_batches: int,
    *,
    forward_only: bool = False,
    breadth_first_micro_batches: int | None = None,
) -> Schedule:
    """Builds the schedule called ``name`` (see :data:`SCHEDULES`) and validates it; ``breadth_first_micro_batches``
    is the group size of memory-bounded breadth-first (``name='breadth_first'`` only, see :func:`breadth_first`)."""
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    check_micro_batch_groups(name, num_micro_batches, breadth_first_micro_batches)
    groups = {} if breadth_first_micro_batches is None else {"breadth_first_micro_batches": breadth_first_micro_batches}
    schedule = SCHEDULES[name](pipeline_size, stages_per_rank, num_micro_batches, forward_only=forward_only, **groups)
    validate_schedule(schedule)
    return schedule
