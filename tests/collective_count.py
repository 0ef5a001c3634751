"""Wraps torch.distributed inside a test job: counts the all-gathers and reduce-scatters of each pipeline stage, and
records when gradient reductions start and are waited for."""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

from lightning_bfpp.run.sharding import ShardedStages


def _issuer() -> Any:
    """The FSDP parameter group, or the stage index of :class:`ShardedStages`, that issues the collective."""
    frame = sys._getframe(2)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, FSDPParamGroup):
            return candidate
        if isinstance(candidate, ShardedStages) and "stage" in frame.f_locals:
            return frame.f_locals["stage"]
        frame = frame.f_back
    return None


def count_fsdp_collectives(strategy: Any, dtypes: Counter[tuple[str, str]] | None = None) -> Counter[tuple[str, int]]:
    """Installs the counting wrappers; the returned counter maps ``(collective, stage)`` to a count: the all-gathers
    FSDP issues for a stage's group, the reduce-scatters the sharded stages issue for a stage's gradients. ``dtypes``,
    if given, counts ``(collective, dtype of what this rank sends)``, e.g. ``("all_gather", "torch.bfloat16")``."""
    counts: Counter[tuple[str, int]] = Counter()

    def stage_of(issuer: Any) -> int:
        if isinstance(issuer, int):
            return issuer
        for stage, shell in strategy.pipeline.data_parallel.stages.items():
            if issuer is not None and issuer in shell._get_fsdp_state()._fsdp_param_groups:
                return stage
        return -1

    def counting(name: str, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[(name, stage_of(_issuer()))] += 1
            if dtypes is not None:
                dtypes[(name, str(kwargs.get("input", args[1] if len(args) > 1 else None).dtype))] += 1
            return original(*args, **kwargs)

        return wrapper

    dist.all_gather_single = counting("all_gather", dist.all_gather_single)
    dist.reduce_scatter_single = counting("reduce_scatter", dist.reduce_scatter_single)
    dist.reduce_scatter_tensor = counting("reduce_scatter", dist.reduce_scatter_tensor)
    return counts


class _RecordedWork:
    """A collective's work handle that logs when it is waited for, and in which executor action."""

    def __init__(self, work: dist.Work, number: int, log: ReductionLog) -> None:
        self._work, self._number, self._log = work, number, log

    def wait(self, *args: Any) -> Any:
        self._log.events.append(("wait", self._number, self._log.action))
        return self._work.wait(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class ReductionLog:
    """The gradient reductions of each step, in order, between the executor's backwards: ``("backward", stage)``
    and ``("reduce_grad", stage)`` when those actions begin, ``("start", n, action)`` when collective ``n`` is
    issued inside one of them (``action``: the executor action running, as ``(kind, stage)``), ``("wait", n,
    action)`` when its work is waited for (``action`` None: outside the executor), ``("batch", i)`` and ``("step",)``
    from the training loop. A synchronous collective is issued asynchronously and waited for at once, which is what
    the synchronous call does. Collectives issued outside those actions (clipping, logging) are not recorded."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.action: tuple[str, int] | None = None
        self._started = 0
        self._inside = False

    def install(self) -> None:
        from lightning_bfpp.run.executor import PipelineExecutor

        for kind in ("backward", "reduce_grad"):
            setattr(PipelineExecutor, f"_{kind}", self._action(kind, getattr(PipelineExecutor, f"_{kind}")))
        for name in ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single"):
            setattr(dist, name, self._collective(getattr(dist, name)))

    def _action(self, kind: str, original: Any) -> Any:
        def wrapper(executor: Any, action: Any) -> None:
            self.action = (kind, action.stage)
            self.events.append(self.action)
            try:
                original(executor, action)
            finally:
                self.action = None

        return wrapper

    def _collective(self, original: Any) -> Any:
        def wrapper(*args: Any, async_op: bool = False, **kwargs: Any) -> Any:
            if self.action is None or self._inside:
                return original(*args, async_op=async_op, **kwargs)
            self._inside = True  # one collective may call another
            try:
                work = original(*args, async_op=True, **kwargs)
            finally:
                self._inside = False
            number, self._started = self._started, self._started + 1
            self.events.append(("start", number, self.action))
            recorded = _RecordedWork(work, number, self)
            if async_op:
                return recorded
            recorded.wait()
            return None

        return wrapper
