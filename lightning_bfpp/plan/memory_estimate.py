"""Peak memory per pipeline rank of a schedule under a cost model, without timing the step.

Memory follows each rank's action order: an activation lives from its forward to its backward (with activation
checkpointing only the stage input is kept, and the stage's activations are rebuilt during the backward). A stage
with batched weight gradients (``W`` actions) keeps ``weight_grad_bytes`` per backward until its next ``W``. Under
ZeRO-3 a stage's parameters are gathered for each run of its computes, as the executor does
(:mod:`lightning_bfpp.plan.gathering`). Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from lightning_bfpp.plan.cost_model import CostModel, _mode, _per_stage
from lightning_bfpp.plan.gathering import compute_runs
from lightning_bfpp.plan.schedule_actions import _B, _F, _RD, _W, Schedule


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory per pipeline rank, in bytes unless said otherwise (one entry per rank)."""

    peak_live_micro_batches: tuple[int, ...]  # (stage, micro-batch) activations alive at once
    peak_activation_bytes: tuple[float, ...]
    param_bytes: tuple[float, ...]  # resident parameters (the rank's shard under ZeRO-3)
    grad_bytes: tuple[float, ...]  # resident gradients (the shard under ZeRO-2/3)
    optimizer_bytes: tuple[float, ...]  # optimizer state (the shard under ZeRO-1/2/3)
    peak_bytes: tuple[float, ...]  # the above plus the peak of activations, gathered parameters, unsharded grads

    @property
    def max_peak_bytes(self) -> float:
        return max(self.peak_bytes)


class _Gather(NamedTuple):
    position: int  # index in the rank's actions of the compute that waits for the gather
    stage: int
    needed: bool  # False when the stage is still gathered (ZeRO-3): no communication


def _walk_rank(schedule: Schedule, rank: int, cost: CostModel) -> tuple[list[_Gather], tuple[int, float, float]]:
    """Walks one rank's actions in order: its gathers, and (peak live micro-batches, peak activation bytes, peak of
    activations + gathered parameters + unsharded gradients)."""
    num_stages, mode = schedule.num_stages, _mode(cost)
    act = _per_stage(cost.activation_bytes, num_stages, "activation_bytes")
    keep = _per_stage(cost.boundary_bytes, num_stages, "boundary_bytes") if cost.activation_checkpointing else act
    params = _per_stage(cost.stage_params, num_stages, "stage_params")
    deferred = _per_stage(cost.weight_grad_bytes, num_stages, "weight_grad_bytes")
    actions = schedule.actions[rank]
    batched = {a.stage for a in actions if a.kind is _W}
    unflushed = dict.fromkeys(batched, 0)  # backwards of each batched stage since its last W
    first_f: dict[int, int] = {}
    first_b: dict[int, int] = {}
    for i, a in enumerate(actions):
        if a.kind is _F:
            first_f.setdefault(a.stage, i)
        elif a.kind is _B:
            first_b.setdefault(a.stage, i)
    points: list[tuple[int, int, str]] = []
    run_end: dict[int, tuple[int, str]] = {}
    if mode == "full":  # ZeRO-3: gathered for each run of a stage's computes, freed after it (as gathering.py does)
        runs = compute_runs(actions)
        points = [(first, s, f"run {k}") for k, (s, first, _) in enumerate(runs)]
        run_end = {last: (s, f"run {k}") for k, (s, _, last) in enumerate(runs)}
    elif mode != "none" and not schedule.forward_only:  # ZeRO-1/2: the updated parameters, before the first forward
        points = sorted((i, s, "fwd") for s, i in first_f.items())
    gathers: list[_Gather] = []
    holds: dict[int, set[str]] = {}
    live = peak_live = 0
    act_now = peak_act = dyn = peak_dyn = 0.0

    def issue(k: int) -> None:  # gather k is issued (prefetched) now
        nonlocal dyn
        position, s, phase = points[k]
        held = bool(holds.get(s))
        gathers.append(_Gather(position, s, mode != "full" or not held))
        if mode == "full":
            dyn += 0.0 if held else params[s] * cost.gathered_bytes
            holds.setdefault(s, set()).add(phase)

    def release(s: int, phase: str) -> None:
        nonlocal dyn
        if mode == "full" and phase in holds.get(s, ()):
            holds[s].discard(phase)
            dyn -= 0.0 if holds[s] else params[s] * cost.gathered_bytes

    point_index = {p[0]: k for k, p in enumerate(points)}
    if points:
        issue(0)
    for i, a in enumerate(actions):
        k = point_index.get(i)
        if k is not None and k + 1 < len(points):
            issue(k + 1)
        s = a.stage
        if a.kind is _F:
            live, act_now = live + 1, act_now + keep[s]
            peak_live, peak_act = max(peak_live, live), max(peak_act, act_now)
            peak_dyn = max(peak_dyn, act_now + dyn)
            if schedule.forward_only:  # nothing is kept for a backward
                live, act_now = live - 1, act_now - keep[s]
        elif a.kind is _B:
            if mode in ("gradients", "full") and i == first_b[s]:
                dyn += params[s] * cost.grad_bytes  # the stage's unsharded gradients until its reduce-scatter
            rebuilt = act[s] if cost.activation_checkpointing else 0.0  # recomputed activations, during B only
            peak_act = max(peak_act, act_now + rebuilt)
            peak_dyn = max(peak_dyn, act_now + rebuilt + dyn)
            live, act_now = live - 1, act_now - keep[s]
            if s in batched:  # the operands of its weight gradients wait for the stage's W
                unflushed[s] += 1
                dyn += deferred[s]
                peak_dyn = max(peak_dyn, act_now + dyn)
        elif a.kind is _W:
            dyn -= unflushed[s] * deferred[s]
            unflushed[s] = 0
        elif a.kind is _RD and mode in ("gradients", "full"):
            dyn -= params[s] * cost.grad_bytes  # reduce-scattered
        if i in run_end:
            release(*run_end[i])
    return gathers, (peak_live, peak_act, peak_dyn)


def resident_bytes(params: float, cost: CostModel) -> tuple[float, float, float]:
    """Resident (parameters, gradients, optimizer state) of ``params`` parameters under the sharding mode. ZeRO-2
    holds its shard and the copy gathered for the whole step."""
    mode, d = _mode(cost), cost.dp_size
    p, g, o = params * cost.param_bytes, params * cost.grad_bytes, params * cost.optimizer_bytes
    return {
        "none": (p, g, o),
        "optimizer": (p, g, o / d),
        "gradients": (p / d + params * cost.gathered_bytes, g / d, o / d),
        "full": (p / d, g / d, o / d),
    }[mode]


def _memory(schedule: Schedule, cost: CostModel) -> tuple[MemoryEstimate, list[list[_Gather]]]:
    params = _per_stage(cost.stage_params, schedule.num_stages, "stage_params")
    gathers, peaks, statics = [], [], []
    for rank in range(schedule.pipeline_size):
        rank_gathers, rank_peaks = _walk_rank(schedule, rank, cost)
        gathers.append(rank_gathers)
        peaks.append(rank_peaks)
        statics.append(resident_bytes(sum(params[s] for s in schedule.stages_of(rank)), cost))
    memory = MemoryEstimate(
        peak_live_micro_batches=tuple(p[0] for p in peaks),
        peak_activation_bytes=tuple(p[1] for p in peaks),
        param_bytes=tuple(s[0] for s in statics),
        grad_bytes=tuple(s[1] for s in statics),
        optimizer_bytes=tuple(s[2] for s in statics),
        peak_bytes=tuple(sum(s) + p[2] for s, p in zip(statics, peaks, strict=True)),
    )
    return memory, gathers


def estimate_memory(schedule: Schedule, cost: CostModel) -> MemoryEstimate:
    """Peak memory per rank without timing the step (memory follows each rank's action order)."""
    return _memory(schedule, cost)[0]
