"""Records what the last stage logs, and replays it on every rank of its pipeline.

Lightning deadlocks when ranks make different ``self.log`` calls (checkpoint and early-stopping callbacks and the
per-batch stop signal are collectives). The hooks that see the model's output run on the last stage only, so their
calls are captured there, averaged over the micro-batches of the batch, sent to the other ranks of the pipeline, and
made again on every rank with the same names, order and options.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class LogCall:
    """One ``self.log`` call, with its value averaged over micro-batches."""

    name: str
    value: float
    dtype: torch.dtype
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]


class LogRecorder:
    """Captures ``self.log`` (and so ``self.log_dict``) calls of a module while active."""

    def __init__(self) -> None:
        self._values: dict[str, list[Tensor]] = {}
        self._options: dict[str, tuple[tuple[Any, ...], tuple[tuple[str, Any], ...]]] = {}

    @contextmanager
    def capture(self, module: nn.Module) -> Iterator[None]:
        module.__dict__["log"] = self._record
        try:
            yield
        finally:
            module.__dict__.pop("log", None)

    def _record(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if not isinstance(value, (Tensor, int, float)):
            raise TypeError(
                f"self.log({name!r}, {type(value).__name__}) inside a pipeline hook: under bfpp these hooks run on the "
                "last stage once per micro-batch, so log a tensor or a number (for a torchmetrics Metric, update it "
                "here and log it from an epoch-end hook such as on_validation_epoch_end)."
            )
        tensor = value.detach() if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
        if tensor.numel() != 1:
            raise ValueError(f"self.log({name!r}, ...) got a tensor of shape {tuple(tensor.shape)}: log a scalar.")
        self._values.setdefault(name, []).append(tensor.reshape(()))
        self._options[name] = (args, tuple(sorted(kwargs.items())))

    def calls(self) -> list[LogCall]:
        """The recorded calls in first-logged order, each value the mean over the micro-batches that logged it."""
        result = []
        for name, values in self._values.items():
            mean = torch.stack([v.double() for v in values]).mean().item()
            args, kwargs = self._options[name]
            result.append(LogCall(name, mean, values[0].dtype, args, kwargs))
        return result


def relay(payload: Any, group: dist.ProcessGroup | None, src: int) -> Any:
    """Broadcasts a picklable ``payload`` from group rank ``src`` to every rank of ``group``."""
    if group is None or dist.get_world_size(group) == 1:
        return payload
    box = [payload]
    dist.broadcast_object_list(box, group=group, group_src=src)
    return box[0]


def replay(module: Any, calls: list[LogCall], device: torch.device) -> None:
    """Makes the recorded ``self.log`` calls on ``module`` (a LightningModule)."""
    for call in calls:
        module.log(
            call.name, torch.tensor(call.value, dtype=call.dtype, device=device), *call.args, **dict(call.kwargs)
        )
