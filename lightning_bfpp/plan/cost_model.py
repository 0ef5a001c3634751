"""The cost model of a pipeline step: per-stage compute times, activation and boundary sizes, links, parameters and
the data-parallel sharding mode, as :func:`lightning_bfpp.plan.simulate.simulate` and
:func:`lightning_bfpp.plan.memory_estimate.estimate_memory` read them. Pure Python, no torch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_bfpp.plan.efficiency import EfficiencyCurve

SHARDING_MODES = ("none", "optimizer", "gradients", "full")
"""Data-parallel modes: plain replicas, and ZeRO-1 (optimizer state), ZeRO-2 (+ gradients), ZeRO-3 (+ parameters)."""

PerStage = float | Sequence[float]


@dataclass(frozen=True)
class CostModel:
    """What one step costs. A per-stage field takes one number for every stage, or a sequence with one per stage.

    Times are in seconds, sizes in bytes, bandwidths in bytes per second (``math.inf``: free).

    Arguments:
        forward_time: forward time of one micro-batch through a stage (the last stage includes the loss).
        backward_time: backward time of one micro-batch through a stage; default ``2 * forward_time``.
        weight_grad_time: the part of ``backward_time`` that computes weight gradients, which a schedule with
            batched weight gradients (``W`` actions) moves into the ``W`` of the run; default half of
            ``backward_time``.
        weight_grad_bytes: memory a backward of a stage with ``W`` actions keeps per micro-batch until the stage's
            next ``W`` (each Linear's input and output gradient, the operands of the batched product).
        weight_grad_rows: rows of one micro-batch's weight-gradient products (tokens); with ``efficiency``, a ``W``
            over ``n`` backwards runs at ``efficiency(n x rows)`` instead of ``efficiency(rows)``
            (:meth:`batched_weight_grad_time`).
        efficiency: kernel efficiency by rows (:class:`~lightning_bfpp.plan.efficiency.EfficiencyCurve`); None: a ``W``
            costs ``weight_grad_time`` per backward it flushes. The other times are given at the micro-batch's rows.
        activation_bytes: memory a stage keeps per micro-batch from its forward to its backward.
        boundary_bytes: size of a stage's output for one micro-batch (sent to the next stage; its gradient is sent
            back and has the same size). With activation checkpointing it is what a stage keeps per micro-batch.
        p2p_latency: latency of one point-to-point transfer.
        p2p_bandwidth: one number, or one per pipeline link ``r -> (r + 1) % P`` (both directions).
        stage_params: number of parameters of each stage.
        dp_size: data-parallel replicas ``D``; with ``D = 1`` there is nothing to reduce or shard.
        dp_bandwidth: bus bandwidth of a ring collective over the replicas, per rank.
        dp_latency: latency added to every collective.
        sharding: one of :data:`SHARDING_MODES`.
        param_bytes: bytes per parameter as each rank keeps it (its shard under ZeRO-2/3), e.g. 2 for bf16
            parameters, 4 for float32 parameters under mixed precision.
        gather_bytes: bytes per parameter that ZeRO-2/3 gathers for the computes (FSDP's parameter dtype, e.g. 2
            for float32 parameters gathered in bf16); None: ``param_bytes``.
        grad_bytes: bytes per gradient element, as kept and reduced (the reduction dtype).
        optimizer_bytes: bytes per parameter of optimizer state, e.g. 8 for Adam's two float32 moments, 12 with a
            float32 master copy of 2-byte parameters.
        activation_checkpointing: keep only stage inputs and recompute the forward in the backward.
        host_time: host (CPU) time to issue one action of the schedule (its Python, autograd and communication
            calls), charged on each rank before the action; measure it on the machine (e.g. a step's CPU time over
            its actions). 0: the host is free.
        host_blocking: the host waits for each compute to end before it issues the next action (CPU tensors, and
            the emulated kernels of ``benchmarks/emulated_cluster.py``), so host time adds to every action; False:
            it queues actions ahead of the device (a GPU step with no host sync), so host time only delays the
            device where it exceeds the kernels.
    """

    forward_time: PerStage
    backward_time: PerStage | None = None
    weight_grad_time: PerStage | None = None
    weight_grad_bytes: PerStage = 0.0
    weight_grad_rows: float = 0.0
    efficiency: EfficiencyCurve | None = None
    activation_bytes: PerStage = 0.0
    boundary_bytes: PerStage = 0.0
    p2p_latency: float = 0.0
    p2p_bandwidth: PerStage = math.inf
    stage_params: PerStage = 0.0
    dp_size: int = 1
    dp_bandwidth: float = math.inf
    dp_latency: float = 0.0
    sharding: str = "none"
    param_bytes: float = 2.0
    gather_bytes: float | None = None
    grad_bytes: float = 2.0
    optimizer_bytes: float = 12.0
    activation_checkpointing: bool = False
    host_time: float = 0.0
    host_blocking: bool = True

    def __post_init__(self) -> None:
        if self.sharding not in SHARDING_MODES:
            raise ValueError(f"sharding={self.sharding!r} is not supported; use one of {', '.join(SHARDING_MODES)}")
        if isinstance(self.dp_size, bool) or not isinstance(self.dp_size, int) or self.dp_size < 1:
            raise ValueError(f"dp_size must be an integer >= 1, got {self.dp_size!r}")
        non_negative = ("p2p_latency", "dp_latency", "host_time", "param_bytes", "gathered_bytes", "grad_bytes")
        for name in (*non_negative, "optimizer_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.dp_bandwidth <= 0:
            raise ValueError(f"dp_bandwidth must be > 0 bytes/s (math.inf for free), got {self.dp_bandwidth}")

    @property
    def gathered_bytes(self) -> float:
        """Bytes per parameter of the gathered copy (``gather_bytes``, else ``param_bytes``)."""
        return self.param_bytes if self.gather_bytes is None else self.gather_bytes

    def batched_weight_grad_time(self, per_micro_batch: float, count: int) -> float:
        """Time of a ``W`` that flushes ``count`` backwards whose weight gradients take ``per_micro_batch`` each:
        one product over ``count x weight_grad_rows`` rows, at that size's efficiency."""
        if self.efficiency is None or count < 2 or self.weight_grad_rows <= 0:
            return count * per_micro_batch
        rows = self.weight_grad_rows
        return count * per_micro_batch * self.efficiency(rows) / self.efficiency(count * rows)


def _per_stage(value: PerStage, count: int, name: str) -> tuple[float, ...]:
    if isinstance(value, int | float):
        return (float(value),) * count
    values = tuple(float(v) for v in value)
    if len(values) != count:
        raise ValueError(f"CostModel.{name} has {len(values)} entries; give one number or exactly {count} (one each)")
    return values


def _mode(cost: CostModel) -> str:
    return cost.sharding if cost.dp_size > 1 else "none"
