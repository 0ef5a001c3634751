"""Records what the last stage logs, and replays it on every rank of its pipeline.

Lightning deadlocks when ranks make different ``self.log`` calls (checkpoint and early-stopping callbacks and the
per-batch stop signal are collectives). The hooks that see the model's output run on the last stage only, so their
calls are captured there, combined over the micro-batches of the batch, sent to the other ranks of the pipeline, and
made again on every rank with the same names, order and options.

torchmetrics ``Metric`` objects are updated on the last stage only. They can be logged as objects from those hooks
(``self.log("acc", self.acc)``): the call is replayed on every rank with the same ``Metric`` attribute, its step value
(``_forward_cache``) set to the mean of the micro-batch values, and its update count copied, so that Lightning computes
and resets it on every rank at the same time. :func:`install_metric_sync` makes every ``compute()`` outside the
last-stage hooks gather the states of the last stage's data-parallel replicas and hand them to every rank of the
pipeline: each rank computes the same, exact, value.

A collective called inside those hooks would wait forever for the ranks that do not run them. The strategy's
collectives ask :func:`refuse_in_pipeline_hook` first: there it records a :class:`PipelineHookError`, which is relayed
with the log calls and raised by :func:`replay` on every rank of the pipeline at the end of the step.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_bfpp.lightning.internals import (
    metric_forward_value,
    metric_update_count,
    set_metric_forward_value,
    set_metric_update_count,
)
from lightning_bfpp.run.collectives import relay

_REDUCTIONS = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}
_capturing = 0  # > 0 while a last-stage hook runs under LogRecorder.capture
_active: list[LogRecorder] = []  # the recorders capturing now, innermost last

_LAST_STAGE_HOOKS = "pipeline_loss, validation_step, test_step and predict_step"


class PipelineHookError(RuntimeError):
    """A call that cannot work inside a hook that runs on the last pipeline stage only; raised on every rank."""


@dataclass(frozen=True)
class DeferredError:
    """The message of a :class:`PipelineHookError` recorded on the last stage, to raise on every rank."""

    message: str


@dataclass(frozen=True)
class LogCall:
    """One ``self.log`` call of a batch, its value combined over the micro-batches that made it.

    ``dtype`` is None for a value logged as a Python number; ``metric`` is the module path of a torchmetrics
    ``Metric`` logged as an object (``value`` is then its step value, or None).
    """

    name: str
    value: float | None
    dtype: torch.dtype | None
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]
    metric: str | None = None


@dataclass(frozen=True)
class MetricCounts:
    """The update counts, after the batch, of the Metric modules that the last stage's hooks updated."""

    counts: tuple[tuple[str, int], ...]


class _Entry:
    __slots__ = ("args", "kwargs", "metric", "values")

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.args: tuple[Any, ...] = ()
        self.kwargs: tuple[tuple[str, Any], ...] = ()
        self.metric: str | None = None


class LogRecorder:
    """Captures ``self.log`` (and so ``self.log_dict``) calls of a module while active."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._module: nn.Module | None = None
        self._counts_before: dict[str, int] | None = None
        self._batch_sizes: dict[str, list[int]] = {}
        self._error: str | None = None

    def defer_error(self, message: str) -> None:
        """Keeps the first error of the batch, raised on every rank by :func:`replay`."""
        if self._error is None:
            self._error = message

    @contextmanager
    def capture(self, module: nn.Module) -> Iterator[None]:
        global _capturing
        if self._counts_before is None:
            self._module = module
            self._counts_before = {name: metric_update_count(m) for name, m in _metrics(module)}
        module.__dict__["log"] = self._record
        _capturing += 1
        _active.append(self)
        try:
            yield
        finally:
            _active.pop()
            _capturing -= 1
            module.__dict__.pop("log", None)

    def _record(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if "sync_dist_group" in kwargs and kwargs["sync_dist_group"] is not None:
            self.defer_error(
                f"self.log({name!r}, ..., sync_dist_group=...) inside a pipeline hook: under bfpp these calls are "
                "replayed on every rank of the pipeline, and `sync_dist=True` already reduces over the data-parallel "
                "replicas; remove sync_dist_group."
            )
            return
        entry = self._entries.setdefault(name, _Entry())
        if isinstance(value, Metric):
            entry.metric = kwargs.pop("metric_attribute", None) or self._metric_name(name, value)
            cache = metric_forward_value(value)
            entry.values.append(cache.detach().double().reshape(()) if isinstance(cache, Tensor) else None)
        elif isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"self.log({name!r}, ...) got a tensor of shape {tuple(value.shape)}: log a scalar.")
            entry.values.append(value.detach().reshape(()))
        elif isinstance(value, numbers.Number) and not isinstance(value, complex):
            entry.values.append(float(value))  # type: ignore[arg-type]
        else:
            raise TypeError(
                f"self.log({name!r}, {type(value).__name__}) inside a pipeline hook: log a scalar tensor, a number or "
                "a torchmetrics Metric."
            )
        if "batch_size" in kwargs and kwargs["batch_size"] is not None:
            self._batch_sizes.setdefault(name, []).append(int(kwargs["batch_size"]))
        entry.args, entry.kwargs = args, tuple(sorted(kwargs.items()))

    def _metric_name(self, name: str, metric: Metric) -> str:
        assert self._module is not None
        for path, module in self._module.named_modules():
            if module is metric:
                return path
        raise ValueError(
            f"self.log({name!r}, <{type(metric).__name__}>): the Metric is not a submodule of the LightningModule; "
            "assign it as an attribute in __init__ (e.g. `self.val_acc = Accuracy(...)`) so that every rank has it."
        )

    def calls(self) -> list[LogCall | MetricCounts | DeferredError]:
        """The metric update counts, then the recorded calls in first-logged order, each value combined over the
        micro-batches as the call's ``reduce_fx`` combines batches (mean, sum, max or min; mean otherwise); first the
        deferred error, if a call could not be made."""
        result: list[LogCall | MetricCounts | DeferredError] = []
        if self._error is not None:
            result.append(DeferredError(self._error))
        if self._module is not None and self._counts_before is not None:
            changed = tuple(
                (name, metric_update_count(m))
                for name, m in _metrics(self._module)
                if self._counts_before.get(name) != metric_update_count(m)
            )
            if changed:
                result.append(MetricCounts(changed))
        for name, entry in self._entries.items():
            kwargs = dict(entry.kwargs)
            if name in self._batch_sizes:  # the batch's size, not the last micro-batch's
                kwargs["batch_size"] = sum(self._batch_sizes[name])
            if entry.metric is not None:
                values = entry.values
                step = None if any(v is None for v in values) else torch.stack(values).mean().item()
                result.append(LogCall(name, step, None, entry.args, tuple(sorted(kwargs.items())), entry.metric))
                continue
            value, dtype = _combine(entry.values, kwargs.get("reduce_fx", "mean"))
            result.append(LogCall(name, value, dtype, entry.args, tuple(sorted(kwargs.items()))))
        return result


def refuse_in_pipeline_hook(call: str) -> bool:
    """Whether ``call``, a collective, was made inside a last-stage hook: then the error is recorded (raised on every
    rank at the end of the step) and the caller must return without communicating."""
    if not _active:
        return False
    _active[-1].defer_error(
        f"{call} was called inside a hook that runs on the last pipeline stage only ({_LAST_STAGE_HOOKS}): the other "
        "ranks never join it, so it would hang. Log the value with self.log(..., sync_dist=True) (reduced over the "
        "data-parallel replicas and shown on every rank), or move the collective to a hook that every rank runs "
        "(on_train_batch_end, on_validation_epoch_end, a callback)."
    )
    return True


def _combine(values: list[Any], reduce_fx: Any) -> tuple[float, torch.dtype | None]:
    op = _reduction_name(reduce_fx)
    dtype = values[0].dtype if isinstance(values[0], Tensor) else None
    stacked = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if op == "sum":
        return stacked.sum().item(), dtype
    if op == "max":
        return stacked.max().item(), dtype
    if op == "min":
        return stacked.min().item(), dtype
    return stacked.mean().item(), dtype


def _reduction_name(reduce_fx: Any) -> str:
    if isinstance(reduce_fx, str):
        return _REDUCTIONS.get(reduce_fx.lower(), "mean")
    for name in ("sum", "max", "min"):
        if reduce_fx is getattr(torch, name):
            return name
    return "mean"


def _metrics(module: nn.Module) -> Iterator[tuple[str, Metric]]:
    for name, sub in module.named_modules():
        if isinstance(sub, Metric):
            yield name, sub


def replay(module: Any, calls: list[LogCall | MetricCounts | DeferredError], device: torch.device) -> None:
    """Makes the recorded ``self.log`` calls on ``module`` (a LightningModule); raises the deferred error, if any."""
    for call in calls:
        if isinstance(call, DeferredError):
            raise PipelineHookError(call.message)
        if isinstance(call, MetricCounts):
            for name, count in call.counts:
                set_metric_update_count(module.get_submodule(name), count)
            continue
        kwargs = dict(call.kwargs)
        if call.metric is not None:
            metric = module.get_submodule(call.metric)
            set_metric_forward_value(
                metric,
                torch.tensor(call.value, dtype=metric.dtype, device=metric.device) if call.value is not None else None,
            )
            module.log(call.name, metric, *call.args, metric_attribute=call.metric, **kwargs)
        elif call.dtype is None:
            value: Any = call.value
            module.log(call.name, value, *call.args, **kwargs)
        else:
            module.log(call.name, torch.tensor(call.value, dtype=call.dtype, device=device), *call.args, **kwargs)


class StepRelay:
    """Hands the last stage's batch loss and recorded calls (:meth:`LogRecorder.calls`) to every rank of the pipeline,
    once per training step.

    The first step, and a step whose calls differ from the previous step's in anything but their values (names,
    options, which values are missing), sends everything as a pickled object (two broadcasts). Otherwise one broadcast
    of a float64 tensor carries the values: exact for the loss, the logged floats and the metric update counts.

    Arguments:
        group: the pipeline's process group (None: nothing to send).
        src: the group rank of the last stage.
        device: where the process group's backend takes tensors.
    """

    def __init__(self, group: dist.ProcessGroup | None, src: int, device: torch.device) -> None:
        self.group, self.src, self.device = group, src, device
        self._layout: tuple[Any, ...] | None = None  # the previous step's, the same on every rank of the pipeline

    def __call__(self, loss: Tensor | None, calls: list[LogCall | MetricCounts] | None) -> tuple[Any, Any]:
        """``loss`` (on the CPU) and ``calls`` on the last stage (None elsewhere); returns them on every rank."""
        if self.group is None or dist.get_world_size(self.group) == 1:
            return loss, calls
        mine = _split(loss, calls) if dist.get_rank(self.group) == self.src else None
        if self._layout is not None:
            values = torch.zeros(1 + _value_count(self._layout), dtype=torch.float64)
            if mine is not None and _same(mine[0], self._layout):
                values[0] = 1.0
                values[1:] = torch.tensor(mine[1], dtype=torch.float64)
            values = values.to(self.device)
            dist.broadcast(values, group=self.group, group_src=self.src)
            received = values.tolist()
            if received[0] == 1.0:
                return _join(self._layout, received[1:])
        layout, numbers_ = relay(mine, self.group, self.src)
        self._layout = layout
        return _join(layout, numbers_)


def _split(
    loss: Tensor | None, calls: list[LogCall | MetricCounts | DeferredError] | None
) -> tuple[tuple[Any, ...], list[float]]:
    """The structure of a step's loss and calls (``("counts", names)``, ``("error", error)`` or ``("call", call
    without value, has value)`` per call), and their values in order."""
    values: list[float] = []
    layout: list[Any] = [None if loss is None else loss.dtype]
    if loss is not None:
        values.append(float(loss))
    for call in calls or []:
        if isinstance(call, DeferredError):
            layout.append(("error", call))
        elif isinstance(call, MetricCounts):
            layout.append(("counts", tuple(name for name, _ in call.counts)))
            values += [float(count) for _, count in call.counts]
        else:
            layout.append(("call", dataclasses.replace(call, value=None), call.value is not None))
            if call.value is not None:
                values.append(call.value)
    return tuple(layout), values


def _value_count(layout: tuple[Any, ...]) -> int:
    count = 0 if layout[0] is None else 1
    for item in layout[1:]:
        if item[0] == "counts":
            count += len(item[1])
        elif item[0] == "call":
            count += int(item[2])
    return count


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    try:
        return bool(a == b)
    except Exception:  # an option that does not compare (a tensor): send the calls as an object
        return False


def _join(layout: tuple[Any, ...], values: list[float]) -> tuple[Tensor | None, list[LogCall | MetricCounts]]:
    it = iter(values)
    loss = None if layout[0] is None else torch.tensor(next(it), dtype=layout[0])
    calls: list[LogCall | MetricCounts] = []
    for item in layout[1:]:
        if item[0] == "counts":
            calls.append(MetricCounts(tuple((name, int(next(it))) for name in item[1])))
        elif item[0] == "error":
            calls.append(item[1])
        else:
            calls.append(dataclasses.replace(item[1], value=next(it)) if item[2] else item[1])
    return loss, calls


class PipelineMetricSync:
    """A torchmetrics ``dist_sync_fn``: the states of the last stage's data-parallel replicas, on every rank.

    Inside a last-stage hook (only the last stage's replicas run it) it gathers over the data-parallel group. Anywhere
    else every rank of the pipeline calls it (Lightning computes logged metrics, and epoch-end hooks run, on every
    rank): the last stage gathers over its replicas and broadcasts the states to the other ranks of its pipeline.
    """

    def __init__(
        self, dp_group: dist.ProcessGroup | None, pp_group: dist.ProcessGroup | None, last: int, is_last: bool
    ) -> None:
        self.dp_group, self.pp_group, self.last, self.is_last = dp_group, pp_group, last, is_last

    def __call__(self, tensor: Tensor, group: Any = None) -> list[Tensor]:
        if _capturing or self.pp_group is None or dist.get_world_size(self.pp_group) == 1:
            return self._gather(tensor)
        parts = [t.cpu() for t in self._gather(tensor)] if self.is_last else None
        parts = relay(parts, self.pp_group, self.last)
        return [t.to(tensor.device) for t in parts]

    def _gather(self, tensor: Tensor) -> list[Tensor]:
        if self.dp_group is None or dist.get_world_size(self.dp_group) == 1:
            return [tensor]
        return gather_all_tensors(tensor, group=self.dp_group)

    def __deepcopy__(self, memo: dict[int, Any]) -> PipelineMetricSync:
        return self  # process groups cannot be copied; a cloned Metric syncs the same way


def install_metric_sync(module: nn.Module, sync: PipelineMetricSync | None) -> None:
    """Makes every torchmetrics ``Metric`` of ``module`` sync through ``sync`` (unless it has its own
    ``dist_sync_fn``); ``None`` removes the sync installed before."""
    for _, metric in _metrics(module):
        if metric.dist_sync_fn is None or isinstance(metric.dist_sync_fn, PipelineMetricSync):
            metric.dist_sync_fn = sync
