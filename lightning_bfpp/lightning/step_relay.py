"""The training step's relay of the last stage's batch loss and ``self.log`` calls to every rank of its pipeline,
without a host read in the steady state.

The last stage knows on the host what it logged: the names, options, which values exist, the metric updates of the
batch (the layout). Every step one broadcast of a float64 device tensor carries ``[flag, loss, values...]``: the loss
always (so that ``on_before_backward`` gets it before anything is read), the values when the layout equals the
previous step's (``flag`` 1). The flag is read on the host at the end of the step together with the non-finite flags
(the step's one host read, :func:`~lightning_bfpp.run.host_sync.host_values_together`), and the values stay on the
device: they are replayed as tensors, which Lightning reads only when a logger or the progress bar is due. The first
step, and a step whose layout changed, sends ``flag`` 0 and then the layout and values as a pickled object. Values
travel as float64: exact for the loss, the logged floats and tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_bfpp.lightning.log_relay import DeferredError, LogCall, MetricCounts
from lightning_bfpp.run.collectives import relay
from lightning_bfpp.run.host_sync import host_values, to_device

Calls = list[LogCall | MetricCounts | DeferredError]


class RelayedStep:
    """A relay started by :meth:`StepRelay.start`: :attr:`loss` is the batch loss on this rank's device at once; read
    :attr:`flag` on the host (None: nothing to read), then call :meth:`result` with its value."""

    def __init__(
        self,
        relay_: StepRelay | None,
        flag: Tensor | None,
        values: Tensor | None,
        mine: Any,
        ready: Any = None,
        loss: Tensor | None = None,
    ) -> None:
        self._relay, self.flag, self._values, self._mine, self._ready = relay_, flag, values, mine, ready
        self.loss = loss if ready is None else ready[0]

    def result(self, flag: float | None) -> tuple[Tensor | None, Calls]:
        """The loss and calls on this rank (the last stage's own; a copy elsewhere)."""
        if self._relay is None:
            return self._ready
        layout = self._relay._layout
        if flag == 1.0 and layout is not None:  # the layout held: the values are on the device already
            if self._mine is not None:
                return self._mine
            assert self._values is not None
            return _join(layout, self._values)
        return self._relay._send_objects(self._mine)


class StepRelay:
    """Hands the last stage's batch loss and recorded calls (:meth:`LogRecorder.calls`) to every rank of the pipeline,
    once per training step (see the module docstring).

    Arguments:
        group: the pipeline's process group (None: nothing to send).
        src: the group rank of the last stage.
        device: where the process group's backend takes tensors.
    """

    def __init__(self, group: dist.ProcessGroup | None, src: int, device: torch.device) -> None:
        self.group, self.src, self.device = group, src, device
        self._layout: tuple[Any, ...] | None = None  # the previous step's, the same on every rank of the pipeline

    def start(self, loss: Tensor, calls: Calls | None) -> RelayedStep:
        """``loss`` (a device tensor) and ``calls`` on the last stage (``loss`` None and ``calls`` None elsewhere).
        Broadcasts the loss, and the values when the layout may have held; reads nothing on the host."""
        if self.group is None or dist.get_world_size(self.group) == 1:
            return RelayedStep(None, None, None, None, ready=(loss, calls))
        mine = (loss, calls) if dist.get_rank(self.group) == self.src else None
        size = 2 + (_value_count(self._layout) if self._layout is not None else 0)
        if mine is not None:
            layout, numbers = _split(*mine)
            held = self._layout is not None and _same(layout, self._layout)
            values = _pack(1.0 if held else 0.0, numbers if held else numbers[:1], self.device)
            if not held:
                values = torch.cat([values, values.new_zeros(size - values.numel())])
        else:
            values = torch.zeros(size, dtype=torch.float64, device=self.device)
        dist.broadcast(values, group=self.group, group_src=self.src)
        dtype = self._layout[0] if self._layout is not None else torch.float64
        relayed_loss = mine[0] if mine is not None else values[1].to(dtype)
        return RelayedStep(self, values[:1], values[1:], mine, loss=relayed_loss)

    def _send_objects(self, mine: tuple[Tensor | None, Calls] | None) -> tuple[Tensor | None, Calls]:
        """The layout and the values as one pickled object (values read on the host on the last stage)."""
        payload = None
        if mine is not None:
            layout, values = _split(*mine)
            payload = (layout, host_values(_pack(0.0, values, self.device))[1:])
        layout, received = relay(payload, self.group, self.src)
        self._layout = layout
        if mine is not None:
            return mine
        return _join(layout, to_device(torch.tensor(received, dtype=torch.float64), self.device))


def _pack(flag: float, values: list[Tensor | float], device: torch.device) -> Tensor:
    """``[flag, *values]`` as one float64 tensor on ``device``: the host numbers uploaded together, without blocking."""
    host = [flag] + [v for v in values if not isinstance(v, Tensor)]
    uploaded = to_device(torch.tensor(host, dtype=torch.float64), device)
    parts, next_host = [uploaded[:1]], 1
    for value in values:
        if isinstance(value, Tensor):
            parts.append(value.detach().reshape(1).to(device=device, dtype=torch.float64))
        else:
            parts.append(uploaded[next_host : next_host + 1])
            next_host += 1
    return torch.cat(parts)


def _split(loss: Tensor | None, calls: Calls | None) -> tuple[tuple[Any, ...], list[Tensor | float]]:
    """The structure of a step's loss and calls (``("counts", updates)``, ``("error", error)`` or ``("call", call
    without value, has value)`` per call), and their values in order."""
    values: list[Tensor | float] = []
    layout: list[Any] = [None if loss is None else loss.dtype]
    if loss is not None:
        values.append(loss)
    for call in calls or []:
        if isinstance(call, DeferredError):
            layout.append(("error", call))
        elif isinstance(call, MetricCounts):
            layout.append(("counts", call.added))
        else:
            layout.append(("call", dataclasses.replace(call, value=None), call.value is not None))
            if call.value is not None:
                values.append(call.value)
    return tuple(layout), values


def _value_count(layout: tuple[Any, ...]) -> int:
    return (0 if layout[0] is None else 1) + sum(int(item[2]) for item in layout[1:] if item[0] == "call")


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    try:
        return bool(a == b)
    except Exception:  # an option that does not compare (a tensor): send the calls as an object
        return False


def _join(layout: tuple[Any, ...], values: Tensor) -> tuple[Tensor | None, Calls]:
    """The loss and calls of ``layout`` with ``values`` (float64, on the device): each value a 0-d view; metric
    updates as counts to add."""
    index = 0
    loss = None
    if layout[0] is not None:
        loss, index = values[0].to(layout[0]), 1
    calls: Calls = []
    for item in layout[1:]:
        if item[0] == "counts":
            calls.append(MetricCounts(item[1], relative=True))
        elif item[0] == "error":
            calls.append(item[1])
        elif item[2]:
            calls.append(dataclasses.replace(item[1], value=values[index]))
            index += 1
        else:
            calls.append(item[1])
    return loss, calls


__all__ = ["RelayedStep", "StepRelay"]
