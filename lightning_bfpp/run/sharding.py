"""Data parallelism over the replicas of a pipeline rank, per stage: gradient averaging (``none``, ``optimizer``) or
parameters and gradients sharded with FSDP2 (``gradients``, ``full``).

The schedule drives both (see :mod:`lightning_bfpp.plan.gathering`): a stage's gradients start their asynchronous
reduction right after its last backward of the step (``REDUCE_GRAD``), overlapping the backward of the stages below,
and are waited for only in :meth:`finish`, before clipping and the optimizer step. Sharded parameters are gathered
once per run of a stage's computes, with the next run's gather started before the current run computes.

A parameter that no replica gave a gradient keeps ``.grad = None`` after the reduction, so that the optimizer skips
it as on one process; one that some replicas gave a gradient gets the average over all replicas, the others
counting zero (as one process computing the whole batch). Each reduction carries one presence count per parameter
for this, in the same collective. A replica that computed every gradient of a stage knows without reading them that
all are present; only a stage with a missing local gradient reads the counts on the host, once the step's
reductions are waited for (:meth:`finish`), never in the middle of the backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from lightning_bfpp.run.host_sync import host_values, to_device

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

SHARDING_MODES = ("none", "optimizer", "gradients", "full")
"""``none``: gradients averaged (all-reduce); ``optimizer``: ZeRO-1, optimizer state sharded; ``gradients``: ZeRO-2,
gradients and optimizer state sharded, parameters gathered once per step; ``full``: ZeRO-3, parameters gathered for
the forward and again for the backward of each stage."""
FSDP_MODES = ("gradients", "full")


@dataclass
class _Reduction:
    """One stage's gradient reduction in flight: the collective's work handle, its output buffer and what to do with
    it once it completed."""

    work: dist.Work
    output: Tensor
    store: Callable[[Tensor], None]
    reads_host: bool  # its store reads the presence counts on the host: only in wait_all, after the backward


class _Reductions:
    """The reductions started during a step, in order; waited for (and their results stored) in :meth:`wait_all`."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._pending: list[_Reduction] = []

    def add(self, work: dist.Work, output: Tensor, store: Callable[[Tensor], None], reads_host: bool) -> None:
        self._pending.append(_Reduction(work, output, store, reads_host))

    def store_completed(self) -> None:
        """Stores the results of the oldest reductions that already completed (frees their buffers early; waiting
        for a completed one returns at once, or raises its error), except those whose store reads the host."""
        while self._pending and not self._pending[0].reads_host and self._pending[0].work.is_completed():
            self._store(self._pending.pop(0))

    def wait_all(self) -> None:
        for reduction in self._pending:
            self._store(reduction)
        self._pending.clear()

    def _store(self, reduction: _Reduction) -> None:
        reduction.work.wait()  # returns at once for a completed one (or raises its error)
        reduction.store(reduction.output.div_(self.size))


def _present(grads: Sequence[Tensor | None], like: Tensor) -> Tensor:
    """1 for each gradient that exists, 0 for each missing one (summed over the replicas by the reduction)."""
    return to_device(torch.tensor([g is not None for g in grads], dtype=like.dtype), like.device)


class StageGradientReducer:
    """Averages the gradients of each stage over the data-parallel group (modes ``none`` and ``optimizer``).

    :meth:`backward_done` starts one asynchronous all-reduce per stage (right after the stage's last backward, so it
    overlaps the backward of the stages below); :meth:`finish` waits for them and writes the averages back.

    Arguments:
        stage_params: the parameters of each local stage, by stage index.
        group: the data-parallel process group (None or size 1: nothing to reduce).
    """

    def __init__(self, stage_params: dict[int, Sequence[nn.Parameter]], group: dist.ProcessGroup | None) -> None:
        self.stage_params = {s: [p for p in params if p.requires_grad] for s, params in stage_params.items()}
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self._reductions = _Reductions(self.size)
        self.enabled = True  # off on batches that only accumulate gradients

    @property
    def active(self) -> bool:
        return self.size > 1

    def run(self, stage: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs ``fn(*args)``, the computation of ``stage``."""
        return fn(*args)

    def gather(self, stage: int) -> None:
        pass  # parameters are replicated

    def reshard(self, stage: int) -> None:
        pass

    def before_backward(self, stage: int, last: bool) -> None:
        pass

    def backward_done(self, stage: int) -> None:
        """Starts the asynchronous reduction of ``stage``'s gradients (with their presence counts); the gradients
        are released until :meth:`finish` stores the averages (the reduction holds a copy)."""
        params = self.stage_params.get(stage, [])
        if not self.enabled or not self.active or not params:
            return
        self._reductions.store_completed()
        grads = [p.grad for p in params]
        bucket = _flatten_dense_tensors(
            [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads, strict=True)]
            + [_present(grads, params[0])]
        )
        for p in params:
            p.grad = None
        work = dist.all_reduce(bucket, group=self.group, async_op=True)
        all_local = all(g is not None for g in grads)
        self._reductions.add(work, bucket, lambda averaged: self._store(params, averaged, all_local), not all_local)

    def _store(self, params: list[nn.Parameter], averaged: Tensor, all_local: bool) -> None:
        *grads, present = _unflatten_dense_tensors(averaged, [*params, torch.empty(len(params))])
        used = [True] * len(params) if all_local else host_values(present)
        for p, grad, is_used in zip(params, grads, used, strict=True):
            p.grad = grad if is_used else None  # no replica computed it: the optimizer skips it, as on one process

    def finish(self) -> None:
        """Waits for every started reduction and stores the averaged gradients."""
        self._reductions.wait_all()


class _StageShell(nn.Module):
    """One stage's layers as one module for ``fully_shard`` (its parameters form one FSDP group). It is not part of
    the LightningModule: the layers stay where they are, under their names; ``forward(fn, *args)`` runs ``fn`` under
    FSDP's hooks."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


class ShardedStages:
    """ZeRO-2/3 with FSDP2: each local stage's layers are one ``fully_shard`` group over the data-parallel mesh.

    Parameters are sharded between steps. The schedule's GATHER/RESHARD actions call :meth:`gather` (an asynchronous
    ``unshard``) and :meth:`reshard`; FSDP's own hooks then find the parameters gathered and neither gather nor free
    them. FSDP's gradient synchronisation stays off: gradients accumulate unsharded over the micro-batches (and over
    the batches of an accumulation window), and :meth:`backward_done` starts one asynchronous reduce-scatter of the
    stage's gradients after its last backward on a batch that steps. (FSDP's own reduce-scatter is a synchronous call
    in its post-backward hook: on CPU it blocks the backward, on GPU its final callback makes the compute stream wait
    for it.) :meth:`finish` waits for them and stores each replica's averaged shard as the sharded ``.grad``.

    Arguments:
        stage_layers: the layers of each local stage, by stage index.
        group: the data-parallel process group.
        device: the device of this rank.
        mp_policy: FSDP's mixed precision (the dtype parameters are gathered in, the dtype gradients are reduced
            in); None: both in the parameters' own dtype.
    """

    def __init__(
        self,
        stage_layers: dict[int, Sequence[nn.Module]],
        group: dist.ProcessGroup,
        device: torch.device,
        mp_policy: MixedPrecisionPolicy | None = None,
    ) -> None:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = DeviceMesh.from_group(group, device.type)
        self.stages: dict[int, Any] = {}
        for stage, layers in stage_layers.items():
            shell = _StageShell(layers)
            if any(p.requires_grad for p in shell.parameters()):
                fully_shard(
                    shell, mesh=mesh, reshard_after_forward=False, mp_policy=mp_policy or MixedPrecisionPolicy()
                )
                shell.set_reshard_after_backward(False)
                shell.set_requires_gradient_sync(False)  # reduced by backward_done, not by FSDP's hooks
            self.stages[stage] = shell
        self.group = group
        self.size = dist.get_world_size(group)
        self._gathers: dict[int, Any] = {}
        self._reductions = _Reductions(self.size)
        self.enabled = True  # off on batches that only accumulate gradients

    def _sharded(self, stage: int) -> Any | None:
        shell = self.stages.get(stage)
        return shell if shell is not None and hasattr(shell, "unshard") else None

    def run(self, stage: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs ``fn(*args)``, the computation of ``stage``, under FSDP's hooks (which wait for the gather)."""
        return self.stages[stage](fn, *args)

    def gather(self, stage: int) -> None:
        """Starts all-gathering ``stage``'s parameters."""
        shell = self._sharded(stage)
        if shell is not None:
            self._gathers[stage] = shell.unshard(async_op=True)

    def reshard(self, stage: int) -> None:
        """Frees ``stage``'s gathered parameters."""
        shell = self._sharded(stage)
        if shell is not None:
            handle = self._gathers.pop(stage, None)
            if handle is not None:
                handle.wait()  # gathered but not used (e.g. a stage without computes this step)
            shell.reshard()

    def before_backward(self, stage: int, last: bool) -> None:
        pass  # gradients accumulate unsharded; backward_done reduces them

    def backward_done(self, stage: int) -> None:
        """Starts the asynchronous reduce-scatter of ``stage``'s unsharded gradients (on batches that step), and
        releases them: the reduction holds them, as each replica's rows of one bucket."""
        shell = self._sharded(stage)
        if shell is None or not self.enabled:
            return
        self._reductions.store_completed()
        params = [p for group in shell._get_fsdp_state()._fsdp_param_groups for p in group.fsdp_params]
        grads = [_take_unsharded_grad(p) for p in params]
        widths = [_shard_width(p.unsharded_param.shape, self.size) for p in params]
        first = params[0]
        dtype = first.reduce_dtype or first.param_dtype or first.orig_dtype
        bucket = torch.zeros(self.size, sum(widths) + len(params), dtype=dtype, device=first.unsharded_param.device)
        offset = 0
        for grad, width in zip(grads, widths, strict=True):
            if grad is not None and width:
                _copy_rows(grad.reshape(-1), bucket[:, offset : offset + width])
            offset += width
        bucket[:, offset:] = _present(grads, bucket)  # every replica's row carries the presence counts
        output = bucket.new_empty(bucket.shape[1])
        work = dist.reduce_scatter_tensor(output, bucket.view(-1), group=self.group, async_op=True)
        all_local = all(g is not None for g in grads)
        self._reductions.add(
            work, output, lambda averaged: _store_shards(params, widths, averaged, all_local), not all_local
        )

    def finish(self) -> None:
        """Waits for every started reduce-scatter and stores this replica's averaged gradient shards."""
        self._reductions.wait_all()
        self._gathers.clear()


def _shard_width(shape: torch.Size, size: int) -> int:
    """The elements of one replica's padded shard of a tensor of ``shape`` (FSDP shards by chunks of dim 0)."""
    rows = shape[0] if len(shape) else 1
    return math.ceil(rows / size) * math.prod(shape[1:])


def _take_unsharded_grad(param: Any) -> Tensor | None:
    """The gradient an FSDP parameter accumulated unsharded (in the reduce dtype if mixed precision keeps one),
    detached from the parameter (the reduction holds it from now on)."""
    grad = param.unsharded_accumulated_grad
    if grad is None:
        grad = param.unsharded_param.grad
    param.unsharded_accumulated_grad = None
    param.unsharded_param.grad = None
    return grad


def _copy_rows(flat: Tensor, rows: Tensor) -> None:
    """Copies ``flat`` into ``rows`` (one row per replica, each of the width of one padded shard), row after row: the
    dim-0 chunks FSDP shards by, the last one padded with zeros."""
    width = rows.shape[1]
    full = flat.numel() // width
    rows[:full].copy_(flat[: full * width].view(full, width))
    rest = flat.numel() - full * width
    if rest:
        rows[full, :rest].copy_(flat[full * width :])


def _store_shards(params: Sequence[Any], widths: Sequence[int], averaged: Tensor, all_local: bool) -> None:
    """Stores this replica's shard of each averaged gradient as its sharded ``.grad`` (added to an existing one); a
    parameter no replica computed a gradient for keeps none (read on the host only unless ``all_local``: this replica
    computed every one)."""
    present = [True] * len(params) if all_local else host_values(averaged[sum(widths) :])
    offset = 0
    for param, width, used in zip(params, widths, present, strict=True):
        if used:
            size = param.sharded_size
            shard = averaged[offset : offset + size.numel()].view(size).to(param.orig_dtype)
            sharded = param.sharded_param
            if sharded.grad is None:
                sharded.grad = param.to_sharded_dtensor(shard)
            else:
                sharded.grad._local_tensor.add_(shard)
        offset += width
