"""Pipeline schedules as data: the ordered actions every pipeline rank runs for one training (or evaluation) step.

There are ``S = pipeline_size * stages_per_rank`` stages; stage ``s`` lives on pipeline rank ``s % pipeline_size``
(looped placement). Every rank builds the same global :class:`Schedule` and walks ``schedule.actions[rank]``.
This module is pure Python on purpose, so schedules can be built, printed and checked without torch.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace


class ActionKind(str, enum.Enum):
    """What an action does; the value is the short tag used when printing actions."""

    FORWARD = "F"  # forward of stage s on micro-batch m (the last stage also computes the loss)
    BACKWARD = "B"  # backward of stage s on micro-batch m
    RECV_ACT = "RA"  # post the receive of stage s's input for micro-batch m, from the rank of s-1
    SEND_ACT = "SA"  # send the output of stage s, micro-batch m, to the rank of s+1
    RECV_GRAD = "RG"  # post the receive of the gradient of stage s's output, micro-batch m, from the rank of s+1
    SEND_GRAD = "SG"  # send the gradient of stage s's input, micro-batch m, to the rank of s-1
    REDUCE_GRAD = "RD"  # start the data-parallel gradient reduction of stage s (micro_batch is -1)
    GATHER = "AG"  # start all-gathering the sharded parameters of stage s (micro_batch is -1; see gathering.py)
    RESHARD = "FR"  # free the gathered parameters of stage s (micro_batch is -1; see gathering.py)
    BACKWARD_WEIGHT = "W"  # weight gradients of stage s's finished run of backwards (micro_batch -1; weight_flush.py)
    GROUP_END = "|"  # ends a communication group: the transfers around it are issued as two groups (stage is -1)


_F, _B, _RA, _SA, _RG, _SG, _RD, _W = (
    ActionKind.FORWARD,
    ActionKind.BACKWARD,
    ActionKind.RECV_ACT,
    ActionKind.SEND_ACT,
    ActionKind.RECV_GRAD,
    ActionKind.SEND_GRAD,
    ActionKind.REDUCE_GRAD,
    ActionKind.BACKWARD_WEIGHT,
)


@dataclass(frozen=True, slots=True)
class Action:
    """One step of a rank's schedule: ``kind`` applied to ``stage`` and ``micro_batch`` (-1 for REDUCE_GRAD)."""

    kind: ActionKind
    stage: int
    micro_batch: int = -1

    def __str__(self) -> str:
        if self.kind is ActionKind.GROUP_END:
            return self.kind.value
        suffix = "" if self.micro_batch < 0 else f".{self.micro_batch}"
        return f"{self.kind.value}{self.stage}{suffix}"


PARAMETER_KINDS = frozenset({ActionKind.GATHER, ActionKind.RESHARD})
"""Actions that move parameters, not activations: present only with sharded parameters."""

PASS_KINDS = PARAMETER_KINDS | {ActionKind.BACKWARD_WEIGHT}
"""Actions that a pass adds to a built schedule when an option needs them, each pass with its own validator."""

COMMUNICATION_KINDS = frozenset({ActionKind.RECV_ACT, ActionKind.SEND_ACT, ActionKind.RECV_GRAD, ActionKind.SEND_GRAD})
"""Point-to-point actions between pipeline ranks."""


GROUP_END = Action(ActionKind.GROUP_END, -1)
"""Separates two communication groups that would otherwise be one (see :func:`communication_groups`)."""


def communication_groups(actions: Sequence[Action]) -> list[tuple[int, ...]]:
    """The positions of each communication group in a rank's ``actions``: a maximal run of consecutive
    point-to-point actions (a GROUP_END marker splits it), which the executor issues together as one
    ``batch_isend_irecv``."""
    groups: list[tuple[int, ...]] = []
    for i, action in enumerate(actions):
        if action.kind not in COMMUNICATION_KINDS:
            continue
        if groups and groups[-1][-1] == i - 1:
            groups[-1] = (*groups[-1], i)
        else:
            groups.append((i,))
    return groups


class ScheduleError(ValueError):
    """A schedule cannot be built with the given settings, or a schedule is invalid."""


def stage_rank(stage: int, pipeline_size: int) -> int:
    """The pipeline rank that holds ``stage`` under looped placement."""
    return stage % pipeline_size


@dataclass(frozen=True)
class Schedule:
    """The global schedule of one step: ``actions[rank]`` is what that pipeline rank executes, in order."""

    name: str
    pipeline_size: int
    stages_per_rank: int
    num_micro_batches: int
    forward_only: bool
    actions: tuple[tuple[Action, ...], ...]

    @property
    def num_stages(self) -> int:
        return self.pipeline_size * self.stages_per_rank

    def rank_of(self, stage: int) -> int:
        """The pipeline rank that holds ``stage``."""
        return stage_rank(stage, self.pipeline_size)

    def stages_of(self, rank: int) -> list[int]:
        """The stages held by ``rank``, in local order."""
        return list(range(rank, self.num_stages, self.pipeline_size))

    def format(self) -> str:
        """One line per rank, e.g. ``rank 0: F0.0 SA0.0 F0.1 ...``."""
        return "\n".join(f"rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(self.actions))


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


def _recvs_for(action: Action, num_stages: int, pipeline_size: int) -> list[Action]:
    """The receive a compute action needs (none for P == 1, where tensors are handed over locally)."""
    if pipeline_size > 1 and action.kind is _F and action.stage > 0:
        return [Action(_RA, action.stage, action.micro_batch)]
    if pipeline_size > 1 and action.kind is _B and action.stage < num_stages - 1:
        return [Action(_RG, action.stage, action.micro_batch)]
    return []


def _sends_for(action: Action, num_stages: int, pipeline_size: int) -> list[Action]:
    """The send that follows a compute action."""
    if pipeline_size > 1 and action.kind is _F and action.stage < num_stages - 1:
        return [Action(_SA, action.stage, action.micro_batch)]
    if pipeline_size > 1 and action.kind is _B and action.stage > 0:
        return [Action(_SG, action.stage, action.micro_batch)]
    return []


def _assemble(name: str, sizes: tuple[int, int, int], forward_only: bool, computes: list[list[Action]]) -> Schedule:
    """Adds sends, receives and REDUCE_GRAD around each rank's compute order, in lock-step.

    The ranks run their computes in time steps, each compute as soon as its input was sent in an earlier step. After
    the compute of a step (or nothing, when the rank waits) comes one communication group (see
    :func:`communication_groups`): the compute's sends and the receives of every message sent to the rank in that
    step. So every message is received in the group of the step it is sent in, and between any two ranks both sides
    issue the same messages in the same order, which NCCL needs: it runs the transfers between two ranks in issue
    order, a receive holding the stream until its data arrives and a send until the peer's receive runs (see
    :mod:`lightning_bfpp.stream_order`). REDUCE_GRAD(s) follows the group of the last BACKWARD of s. Breadth-first
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
        out, k = list(actions), 0
        while k < len(groups := communication_groups(out)):
            group, k = groups[k], k + 1
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
                out[to:to] = [GROUP_END, *moved] if to > 0 and out[to - 1].kind in COMMUNICATION_KINDS else moved
        ranks.append(tuple(out))
    return replace(schedule, actions=tuple(ranks))


def _matching_recv(send: Action) -> Action:
    """The receive of the message ``send`` sends."""
    if send.kind is _SA:
        return Action(_RA, send.stage + 1, send.micro_batch)
    return Action(_RG, send.stage - 1, send.micro_batch)


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


# ---------------------------------------------------------------------------------------------------------------
# validation

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


def _first_of(actions: Iterable[Action], kind: ActionKind) -> dict[int, Action]:
    first: dict[int, Action] = {}
    for action in actions:
        if action.kind is kind:
            first.setdefault(action.stage, action)
    return first


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


def _message(action: Action) -> tuple[str, int, int] | None:
    """The message a communication action sends or receives, named by its kind, downstream stage and micro-batch."""
    if action.kind is _SA:
        return ("act", action.stage + 1, action.micro_batch)
    if action.kind is _RA:
        return ("act", action.stage, action.micro_batch)
    if action.kind is _SG:
        return ("grad", action.stage, action.micro_batch)
    if action.kind is _RG:
        return ("grad", action.stage + 1, action.micro_batch)
    return None
