"""Data parallelism over the replicas of a pipeline rank: gradient averaging, one bucket per stage."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

SHARDING_MODES = ("none",)


class StageGradientReducer:
    """Averages the gradients of each stage over the data-parallel group.

    :meth:`start` launches one asynchronous all-reduce per stage (called right after the stage's last backward, so it
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

    def start(self, stage: int) -> None:
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
