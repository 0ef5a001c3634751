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
from lightning_bfpp.run.host_sync import host_tensor, host_values, to_device

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

    ``value`` is a float for a value logged as a Python number (``dtype`` None), else a scalar float64 tensor on the
    device (never read on the host here: Lightning reads it when a logger is due); ``metric`` is the module path of a
    torchmetrics ``Metric`` logged as an object (``value`` is then its step value, or None).
    """

    name: str
    value: float | Tensor | None
    dtype: torch.dtype | None
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]
    metric: str | None = None


@dataclass(frozen=True)
class MetricCounts:
    """The update counts, after the batch, of the Metric modules that the last stage's hooks updated; ``relative``:
    the counts are the updates of the batch, to add to the counts of a rank that did not run the hooks."""

    counts: tuple[tuple[str, int], ...]
    relative: bool = False
    added: tuple[tuple[str, int], ...] = ()  # the batch's updates (for the training step's relay)


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
            entry.values.append(float(value))  # type: ignore[arg-type]  # host number
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
            before = self._counts_before
            changed = tuple(
                (name, metric_update_count(m))
                for name, m in _metrics(self._module)
                if before.get(name) != metric_update_count(m)
            )
            if changed:
                added = tuple((name, count - before.get(name, 0)) for name, count in changed)
                result.append(MetricCounts(changed, added=added))
        for name, entry in self._entries.items():
            kwargs = dict(entry.kwargs)
            if name in self._batch_sizes:  # the batch's size, not the last micro-batch's
                kwargs["batch_size"] = sum(self._batch_sizes[name])
            if entry.metric is not None:
                values = entry.values
                step = None if any(v is None for v in values) else torch.stack(values).mean()
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


def _combine(values: list[Any], reduce_fx: Any) -> tuple[float | Tensor, torch.dtype | None]:
    """The micro-batch values combined in float64: on the host for numbers, on the device (no read) for tensors."""
    op = _reduction_name(reduce_fx)
    if not any(isinstance(v, Tensor) for v in values):
        numbers_ = [float(v) for v in values]  # host number: Python numbers, no device involved
        if op == "sum":
            return sum(numbers_), None
        combined = {"max": max, "min": min}.get(op)
        return (combined(numbers_) if combined else sum(numbers_) / len(numbers_)), None
    dtype = next(v.dtype for v in values if isinstance(v, Tensor))
    device = next(v.device for v in values if isinstance(v, Tensor))
    stacked = torch.stack([_as_float64(v, device) for v in values])
    if op == "sum":
        return stacked.sum(), dtype
    if op == "max":
        return stacked.max(), dtype
    if op == "min":
        return stacked.min(), dtype
    return stacked.mean(), dtype


def _as_float64(value: Any, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().to(torch.float64)
    return to_device(torch.tensor(float(value), dtype=torch.float64), device)  # host number


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
                metric = module.get_submodule(name)
                set_metric_update_count(metric, metric_update_count(metric) + count if call.relative else count)
            continue
        kwargs = dict(call.kwargs)
        if call.metric is not None:
            metric = module.get_submodule(call.metric)
            value = None if call.value is None else _as_tensor(call.value, metric.dtype, metric.device)
            set_metric_forward_value(metric, value)
            module.log(call.name, metric, *call.args, metric_attribute=call.metric, **kwargs)
        elif call.dtype is None and not isinstance(call.value, Tensor):
            module.log(call.name, call.value, *call.args, **kwargs)
        else:  # a tensor; a number relayed as a tensor becomes the tensor Lightning makes of a number
            dtype = call.dtype or torch.get_default_dtype()
            module.log(call.name, _as_tensor(call.value, dtype, device), *call.args, **kwargs)


def _as_tensor(value: float | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype)
    return to_device(torch.tensor(value, dtype=dtype), device)


def calls_on_host(calls: list[LogCall | MetricCounts | DeferredError]) -> list[LogCall | MetricCounts | DeferredError]:
    """``calls`` with their tensor values as floats (one host read): what travels as a pickled object."""
    tensors = [c.value for c in calls if isinstance(c, LogCall) and isinstance(c.value, Tensor)]
    if not tensors:
        return calls
    values = iter(host_values(torch.stack([t.to(torch.float64) for t in tensors])))
    return [
        dataclasses.replace(c, value=next(values)) if isinstance(c, LogCall) and isinstance(c.value, Tensor) else c
        for c in calls
    ]


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
        parts = [host_tensor(t) for t in self._gather(tensor)] if self.is_last else None
        parts = relay(parts, self.pp_group, self.last)
        return [to_device(t, tensor.device) for t in parts]

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
