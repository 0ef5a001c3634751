"""Data parallelism over the replicas of a pipeline rank, per stage: gradient averaging (``none``, ``optimizer``) or
parameters and gradients sharded with FSDP2 (``gradients``, ``full``).

The schedule drives both (see :mod:`lightning_bfpp.gathering`): a stage's gradients are reduced right after its last
backward of the step, overlapping the backward of the stages below, and sharded parameters are gathered once per run
of a stage's computes, with the next run's gather started before the current run computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

SHARDING_MODES = ("none", "optimizer", "gradients", "full")
"""``none``: gradients averaged (all-reduce); ``optimizer``: ZeRO-1, optimizer state sharded; ``gradients``: ZeRO-2,
gradients and optimizer state sharded, parameters gathered once per step; ``full``: ZeRO-3, parameters gathered for
the forward and again for the backward of each stage."""
FSDP_MODES = ("gradients", "full")


class StageGradientReducer:
    """Averages the gradients of each stage over the data-parallel group (modes ``none`` and ``optimizer``).

    :meth:`backward_done` launches one asynchronous all-reduce per stage (right after the stage's last backward, so it
    overlaps the backward of the stages below); :meth:`finish` waits for them and writes the averages back.

    Arguments:
        stage_params: the parameters of each local stage, by stage index.
        group: the data-parallel process group (None or size 1: nothing to reduce).
    """

    def __init__(self, stage_params: dict[int, Sequence[nn.Parameter]], group: dist.ProcessGroup | None) -> None:
        self.stage_params = {s: [p for p in params if p.requires_grad] for s, params in stage_params.items()}
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self._pending: list[tuple[dist.Work, torch.Tensor, list[nn.Parameter]]] = []
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
        """Starts the asynchronous reduction of ``stage``'s gradients."""
        params = self.stage_params.get(stage, [])
        if not self.enabled or not self.active or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        bucket = _flatten_dense_tensors(grads)
        work = dist.all_reduce(bucket, group=self.group, async_op=True)
        self._pending.append((work, bucket, params))

    def finish(self) -> None:
        """Waits for every started reduction and stores the averaged gradients."""
        for work, bucket, params in self._pending:
            work.wait()
            bucket.div_(self.size)
            for p, grad in zip(params, _unflatten_dense_tensors(bucket, params), strict=True):
                p.grad = grad
        self._pending.clear()


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
    them. Gradients accumulate unsharded over the micro-batches (and over the batches of an accumulation window) and
    are reduce-scattered once, by the post-backward hook of the stage's last backward on a batch that steps.

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
                shell.set_requires_gradient_sync(False)
            self.stages[stage] = shell
        self._pending: dict[int, Any] = {}
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
            self._pending[stage] = shell.unshard(async_op=True)

    def reshard(self, stage: int) -> None:
        """Frees ``stage``'s gathered parameters."""
        shell = self._sharded(stage)
        if shell is not None:
            handle = self._pending.pop(stage, None)
            if handle is not None:
                handle.wait()  # gathered but not used (e.g. a stage without computes this step)
            shell.reshard()

    def before_backward(self, stage: int, last: bool) -> None:
        """Makes the backward of ``stage``'s last micro-batch reduce-scatter its gradients, on batches that step."""
        shell = self._sharded(stage)
        if shell is not None:
            shell.set_requires_gradient_sync(self.enabled and last, recurse=False)

    def backward_done(self, stage: int) -> None:
        pass  # the last backward's post-backward hook has started the reduce-scatter

    def finish(self) -> None:
        """Gradient synchronisation is off again until the next batch's last backwards."""
        for stage in self.stages:
            shell = self._sharded(stage)
            if shell is not None:
                shell.set_requires_gradient_sync(False, recurse=False)
        self._pending.clear()
