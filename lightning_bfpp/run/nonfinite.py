"""Non-finite losses and gradients: found on whichever rank holds them, agreed on by every rank with one small
all-reduce per optimizer step, so that every rank raises, or every rank skips the step, and the ranks never diverge.
The flags are read on the host with the step's other end-of-step values (:meth:`NonFiniteCheck.start`, then
:meth:`NonFiniteCheck.finish`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_bfpp.run.collectives import all_gather_objects
from lightning_bfpp.run.host_sync import host_values, to_device

NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteError(RuntimeError):
    """A NaN or inf in a micro-batch loss or a gradient (raised on every rank with ``nonfinite_loss="raise"``)."""


class NonFiniteCheck:
    """Collects the losses of the batches of one accumulation window, then checks them and the gradients.

    Arguments:
        rank: this process's global rank (named in the descriptions).
        device: where the flags are reduced (the device of the process group's backend).
        group: the process group that must agree (None: every process).
    """

    def __init__(self, rank: int, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
        self.rank = rank
        self.device = device
        self.group = group
        self._losses: list[tuple[int, Tensor]] = []
        self.gradients_only = False  # the last check found non-finite gradients on some rank and only finite losses
        self._started: tuple[list[tuple[str, Tensor]], list[Tensor]] = ([], [])

    def add_losses(self, batch_idx: int, losses: Sequence[Tensor]) -> None:
        """Records the micro-batch losses of one batch (empty on ranks without the last stage)."""
        if losses:
            self._losses.append((batch_idx, torch.stack([loss.detach() for loss in losses])))

    def start(self, named_grads: Iterable[tuple[str, Tensor]], extra: Sequence[int] = ()) -> Tensor:
        """Starts agreeing: one all-reduce (MAX) of two flags over the group, non-finite losses and non-finite
        gradients, followed by ``extra`` (other host values the ranks agree on in the same collective); returns the
        flags on the device without reading them. Hand the first two values to :meth:`finish`."""
        named = list(named_grads)
        grads = [g.to_local() if hasattr(g, "to_local") else g for _, g in named]  # DTensor: the local shard
        flags = self._flags(extra)
        if self._losses:
            flags[0] = (~torch.isfinite(torch.cat([v for _, v in self._losses]))).any().to(self.device)
        if grads:
            norms = torch._foreach_norm(grads)  # NaN or inf exactly when the gradient holds one
            flags[1] = (~torch.isfinite(torch.stack([n.to(self.device) for n in norms]))).any()
        self._reduce(flags)
        self._started = (named, grads)
        return flags

    def start_extra(self, extra: Sequence[int]) -> Tensor:
        """:meth:`start` without checking anything (a batch that only accumulates): the two flags zero, ``extra``
        agreed on."""
        return self._reduce(self._flags(extra))

    def _flags(self, extra: Sequence[int]) -> Tensor:
        flags = torch.zeros(2 + len(extra), dtype=torch.int32, device=self.device)
        if extra:
            flags[2:] = to_device(torch.tensor(list(extra), dtype=torch.int32), self.device)
        return flags

    def _reduce(self, flags: Tensor) -> Tensor:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return flags

    def finish(self, found: Sequence[float]) -> list[str]:
        """From the values of :meth:`start`'s flags (read on the host): what was non-finite on any rank (the same
        list on every rank; empty when everything is finite); forgets the recorded losses."""
        named, grads = self._started
        self._started = ([], [])
        losses, self._losses = self._losses, []
        self.gradients_only = bool(found[1] and not found[0])
        if not any(found):
            return []
        mine = [
            f"the loss of micro-batch {m} of batch {batch} on global rank {self.rank} is {value:g}"
            for batch, values in losses
            for m, value in enumerate(host_values(values))
            if not math.isfinite(value)
        ]
        finite = host_values(torch.stack([torch.isfinite(g).all() for g in grads])) if grads else []
        bad = [name for (name, _), ok in zip(named, finite, strict=True) if not ok]
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            mine.append(f"the gradients of {shown} on global rank {self.rank}")
        return [line for lines in all_gather_objects(mine, self.group) for line in lines]

    def check(self, named_grads: Iterable[tuple[str, Tensor]]) -> list[str]:
        """:meth:`start` and :meth:`finish` with one host read of the flags in between."""
        return self.finish(host_values(self.start(named_grads)))


def back_off(scaler: torch.amp.GradScaler) -> None:
    """What ``scaler.update()`` does after an overflow: the scale times the backoff factor, the count of steps
    towards the next growth restarted. Applied on every rank at once, it keeps the ranks' scales equal."""
    state = scaler.state_dict()
    scaler.load_state_dict({**state, "scale": state["scale"] * state["backoff_factor"], "_growth_tracker": 0})
