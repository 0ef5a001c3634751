"""Predicts step time, bubble and memory of a schedule from a cost model, by an event simulation over its actions.

The simulator walks the same per-rank action lists as the executor (:mod:`lightning_bfpp.plan.schedule`). Every pipeline
rank has a compute stream, on which FORWARD and BACKWARD run one after the other, and a communication stream for the
data-parallel collectives, which overlaps compute:

- ``F(s, m)`` waits for its input: the transfer of ``SA(s-1, m)`` to the posted ``RA(s, m)`` (latency plus
  ``boundary_bytes / bandwidth``; transfers over one link and direction go one at a time). ``B(s, m)`` waits for
  the gradient of ``SG(s+1, m)`` in the same way. Sends and receive posts take no compute time.
- Transfers go in the schedule's communication groups, as the executor issues them on NCCL
  (:func:`~lightning_bfpp.plan.schedule.communication_groups`): a rank's groups run one after another, each from its
  issue once the previous one is done; a transfer runs once the groups of both sides have started; a compute waits
  for the whole group that holds its input.
- ``W(s)`` (batched weight gradients, :mod:`lightning_bfpp.plan.weight_flush`) runs on the compute stream: it costs
  ``weight_grad_time`` for every backward of ``s`` since the previous ``W(s)`` (less with a kernel efficiency curve:
  :meth:`~lightning_bfpp.plan.cost_model.CostModel.batched_weight_grad_time`), and those backwards cost that much
  less each.
- ``RD(s)`` launches the stage's gradient reduction on the communication stream: an all-reduce without sharding, a
  reduce-scatter with ZeRO-1/2/3. The step ends when every compute and every collective is done.
- ZeRO-1/2 (``optimizer``/``gradients``) all-gather each stage's updated parameters before its first forward; ZeRO-3
  (``full``) gathers a stage for each run of its consecutive computes and frees it after the run, as the executor
  does (:mod:`lightning_bfpp.plan.gathering`). Gathers are prefetched one ahead: the next gather is issued when the
  compute that waits for the previous one starts.
- Host time (``CostModel.host_time``): each rank's host spends it on every action before issuing it (a transfer
  group is issued once its actions' host time is spent; a compute, ``W`` or ``RD`` starts no earlier). A blocking
  host (``host_blocking``, CPU) issues the next action only after the previous compute ends; a non-blocking one runs
  ahead of the device, which then waits for the host only where kernels are shorter than the host time.

Memory follows each rank's action order: an activation lives from its forward to its backward (with activation
checkpointing only the stage input is kept, and the stage's activations are rebuilt during the backward).
Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from lightning_bfpp.plan.cost_model import SHARDING_MODES, CostModel, PerStage, _mode, _per_stage
from lightning_bfpp.plan.memory_estimate import MemoryEstimate, _memory, estimate_memory, resident_bytes
from lightning_bfpp.plan.schedule_actions import (
    _B,
    _F,
    _RA,
    _RD,
    _RG,
    _SA,
    _SG,
    _W,
    Action,
    Schedule,
    ScheduleError,
    communication_groups,
)
from lightning_bfpp.plan.timeline import TimedEvent, plot_rows

__all__ = [  # the cost model and the memory estimate live in their own modules; this module keeps their names
    "SHARDING_MODES",
    "CostModel",
    "MemoryEstimate",
    "PerStage",
    "SimEvent",
    "SimResult",
    "estimate_memory",
    "plot_timeline",
    "resident_bytes",
    "simulate",
]


class SimEvent(NamedTuple):
    """One simulated span on ``rank``: a compute (``forward``/``backward``/``backward_weight``), a data-parallel
    collective (``all_gather``/``reduce_scatter``/``all_reduce``) or a transfer sent by the rank
    (``send_act``/``send_grad``)."""

    rank: int
    name: str
    category: str
    start: float
    end: float


@dataclass(frozen=True)
class SimResult:
    """A simulated step: its time, each rank's compute (busy) time, memory and, if recorded, the events."""

    step_time: float
    compute_time: tuple[float, ...]
    memory: MemoryEstimate
    events: tuple[SimEvent, ...]

    @property
    def bubble_fraction(self) -> float:
        """``1 - busy compute time / (ranks * step time)``: the idle share of the pipeline."""
        return 1.0 - sum(self.compute_time) / (len(self.compute_time) * self.step_time) if self.step_time else 0.0

    @property
    def rank_bubble_fractions(self) -> tuple[float, ...]:
        return tuple(1.0 - c / self.step_time if self.step_time else 0.0 for c in self.compute_time)


def _collective_times(cost: CostModel, params: float) -> dict[str, float]:
    """Ring all-gather / reduce-scatter / all-reduce time of one stage's parameters or gradients."""
    share = (cost.dp_size - 1) / cost.dp_size
    gather = cost.dp_latency + share * params * cost.gathered_bytes / cost.dp_bandwidth
    scatter = cost.dp_latency + share * params * cost.grad_bytes / cost.dp_bandwidth
    return {"all_gather": gather, "reduce_scatter": scatter, "all_reduce": 2 * scatter - cost.dp_latency}


def simulate(schedule: Schedule, cost: CostModel, *, record_events: bool = True) -> SimResult:
    """Simulates one step of ``schedule`` under ``cost``; see the module docstring for the rules."""
    num_stages, pipeline_size = schedule.num_stages, schedule.pipeline_size
    forward = _per_stage(cost.forward_time, num_stages, "forward_time")
    backward = (
        tuple(2 * f for f in forward)
        if cost.backward_time is None
        else _per_stage(cost.backward_time, num_stages, "backward_time")
    )
    weight = (
        tuple(b / 2 for b in backward)
        if cost.weight_grad_time is None
        else _per_stage(cost.weight_grad_time, num_stages, "weight_grad_time")
    )
    for s, (w, b) in enumerate(zip(weight, backward, strict=True)):
        if not 0 <= w <= b:
            raise ValueError(f"CostModel.weight_grad_time of stage {s} is {w}: give a time in [0, backward_time={b}]")
    batched = {a.stage for actions in schedule.actions for a in actions if a.kind is _W}
    backward = tuple(b - w if s in batched else b for s, (b, w) in enumerate(zip(backward, weight, strict=True)))
    if cost.activation_checkpointing:
        backward = tuple(b + f for b, f in zip(backward, forward, strict=True))
    unflushed = [0] * num_stages  # backwards of each stage since its last W
    boundary = _per_stage(cost.boundary_bytes, num_stages, "boundary_bytes")
    bandwidth = _per_stage(cost.p2p_bandwidth, pipeline_size, "p2p_bandwidth")
    params = _per_stage(cost.stage_params, num_stages, "stage_params")
    collective = [_collective_times(cost, p) for p in params]
    memory, gathers = _memory(schedule, cost)
    mode, last = _mode(cost), num_stages - 1
    reduce_kind = "all_reduce" if mode == "none" else "reduce_scatter"

    clock, comm_free, busy = [0.0] * pipeline_size, [0.0] * pipeline_size, [0.0] * pipeline_size
    host, host_time = [0.0] * pipeline_size, cost.host_time  # when each rank's host has issued its latest action
    gather_end: list[dict[int, float]] = [{} for _ in range(pipeline_size)]
    gather_at = [{g.position: k for k, g in enumerate(rank_gathers)} for rank_gathers in gathers]
    sent: dict[tuple[bool, int, int], float] = {}  # (is_grad, receiving stage, micro-batch) -> send time
    posted: dict[tuple[bool, int, int], float] = {}
    arrival: dict[tuple[bool, int, int], float] = {}
    channel_free: dict[tuple[bool, int], float] = {}
    events: list[SimEvent] = []

    def collective_op(rank: int, kind: str, stage: int, issued: float) -> float:
        start = max(issued, comm_free[rank])
        comm_free[rank] = end = start + (collective[stage][kind] if cost.dp_size > 1 else 0.0)
        if record_events and end > start:
            events.append(SimEvent(rank, f"{kind} {stage}", kind, start, end))
        return end

    def issue_gather(rank: int, k: int, issued: float) -> None:
        if k < len(gathers[rank]):
            g = gathers[rank][k]
            gather_end[rank][k] = collective_op(rank, "all_gather", g.stage, issued) if g.needed else issued

    # point-to-point groups (see schedule.communication_groups): each rank runs its groups one after the other on one
    # stream, a group starts when it is issued and the rank's previous group is done, a transfer runs when the groups
    # of both sides have started, and a group is done when all its transfers are; a compute waits for the whole group
    # that holds its input, as the executor waits for the group's work on NCCL
    group_of = [{i: g for g in communication_groups(actions) for i in g} for actions in schedule.actions]
    group_keys: dict[tuple[int, tuple[int, ...]], list[tuple[bool, int, int]]] = {}
    stream_last: list[tuple[int, ...] | None] = [None] * pipeline_size  # each rank's last issued group
    group_start: dict[tuple[int, tuple[int, ...]], float] = {}

    def key_of(a: Action) -> tuple[bool, int, int]:
        if a.kind is _SA or a.kind is _RA:
            return (False, a.stage + 1 if a.kind is _SA else a.stage, a.micro_batch)
        return (True, a.stage - 1 if a.kind is _SG else a.stage, a.micro_batch)

    def group_end(rank: int, group: tuple[int, ...] | None) -> float | None:
        if group is None:
            return 0.0
        keys = group_keys[(rank, group)]
        if any(k not in arrival for k in keys):
            return None
        return max([group_start[(rank, group)], *(arrival[k] for k in keys)])

    def message(key: tuple[bool, int, int], when: float, is_send: bool) -> None:
        (sent if is_send else posted)[key] = when
        if key in sent and key in posted:  # both sides ready: the transfer runs on its link, one at a time
            is_grad, stage, m = key
            link = stage % pipeline_size if is_grad else (stage - 1) % pipeline_size
            start = max(sent[key], posted[key], channel_free.get((is_grad, link), 0.0))
            channel_free[(is_grad, link)] = end = start + boundary[stage] / bandwidth[link]
            arrival[key] = end + cost.p2p_latency
            if record_events:
                src = (stage + 1 if is_grad else stage - 1) % pipeline_size
                name, category = (f"SG{stage + 1}.{m}", "send_grad") if is_grad else (f"SA{stage - 1}.{m}", "send_act")
                events.append(SimEvent(src, name, category, start, end))

    recv_group: list[dict[tuple[bool, int, int], tuple[int, ...]]] = [{} for _ in range(pipeline_size)]

    def ready_at(rank: int, a: Action) -> float | None:  # when the inputs of a compute are there; None: not yet known
        local = pipeline_size == 1
        if a.kind is _F and a.stage > 0 and not local:
            group = recv_group[rank].get((False, a.stage, a.micro_batch))
        elif a.kind is _B and a.stage < last and not local:
            group = recv_group[rank].get((True, a.stage, a.micro_batch))
        else:
            return 0.0
        return None if group is None else group_end(rank, group)

    for rank in range(pipeline_size):
        issue_gather(rank, 0, 0.0)
    pointers, remaining = [0] * pipeline_size, sum(len(a) for a in schedule.actions)
    while remaining:
        progressed = False
        for rank, actions in enumerate(schedule.actions):
            i = pointers[rank]
            while i < len(actions):
                a = actions[i]
                if a.kind is _F or a.kind is _B:
                    ready = ready_at(rank, a)
                    if ready is None:
                        break
                    issued = host[rank] + host_time
                    start = max(clock[rank], ready, issued)
                    k = gather_at[rank].get(i)
                    if k is not None:
                        start = max(start, gather_end[rank][k])
                        issue_gather(rank, k + 1, start)
                    duration = forward[a.stage] if a.kind is _F else backward[a.stage]
                    clock[rank] = start + duration
                    host[rank] = clock[rank] if cost.host_blocking else issued
                    busy[rank] += duration
                    unflushed[a.stage] += a.kind is _B
                    if record_events:
                        name = "forward" if a.kind is _F else "backward"
                        events.append(SimEvent(rank, str(a), name, start, clock[rank]))
                elif a.kind is _W:
                    issued = host[rank] + host_time
                    start = max(clock[rank], issued)
                    duration = cost.batched_weight_grad_time(weight[a.stage], unflushed[a.stage])
                    clock[rank], unflushed[a.stage] = start + duration, 0
                    host[rank] = clock[rank] if cost.host_blocking else issued
                    busy[rank] += duration
                    if record_events:
                        events.append(SimEvent(rank, str(a), "backward_weight", start, clock[rank]))
                elif i in group_of[rank]:
                    group = group_of[rank][i]
                    if i == group[0]:  # the group is issued: it starts after the rank's previous group
                        previous = group_end(rank, stream_last[rank])
                        if previous is None:
                            break
                        group_keys[(rank, group)] = [key_of(actions[j]) for j in group]
                        host[rank] += host_time * len(group)  # posted together once every transfer is added
                        group_start[(rank, group)] = max(clock[rank], host[rank], previous)
                        stream_last[rank] = group
                    key = key_of(a)
                    if a.kind is _RA or a.kind is _RG:
                        recv_group[rank][key] = group
                    message(key, group_start[(rank, group)], a.kind is _SA or a.kind is _SG)
                elif a.kind is _RD:
                    host[rank] += host_time
                    collective_op(rank, reduce_kind, a.stage, max(clock[rank], host[rank]))
                i += 1
            if i > pointers[rank]:
                remaining -= i - pointers[rank]
                pointers[rank] = i
                progressed = True
        if not progressed:
            lists = schedule.actions
            blocked = ", ".join(f"rank {r} at {lists[r][p]}" for r, p in enumerate(pointers) if p < len(lists[r]))
            raise ScheduleError(f"the simulation is stuck ({blocked}); check the schedule with validate_schedule()")
    step_time = max(max(clock), max(comm_free), max(host))
    return SimResult(step_time, tuple(busy), memory, tuple(sorted(events, key=lambda e: (e.rank, e.start))))


def plot_timeline(events: Sequence[SimEvent], path: str | Path, title: str = "") -> Path:
    """Draws simulated events: one row per rank (compute on top, collectives in a thin strip under it); the gaps in
    the compute rows are the bubble. Needs matplotlib (``pip install -e ".[plot]"``)."""
    by_rank: dict[int, list[TimedEvent]] = {}
    for e in events:
        if not e.category.startswith("send"):
            by_rank.setdefault(e.rank, []).append(TimedEvent(e.name, e.category, e.start, e.end))
    try:
        return plot_rows(by_rank, path, title or "simulated step", "time (units of the cost model, e.g. s)")
    except ImportError as error:
        raise ImportError('plot_timeline needs matplotlib: pip install -e ".[plot]"') from error
