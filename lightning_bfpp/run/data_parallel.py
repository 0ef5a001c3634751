"""The data-parallel modes behind one protocol: gradient averaging (``none``, and ``optimizer``, whose optimizer part
is :mod:`lightning_bfpp.run.zero`) or FSDP2-sharded stages (``gradients``, ``full``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from lightning_bfpp.run.sharding import FSDP_MODES, ShardedStages, StageGradientReducer

SHARDED_ATTRIBUTE = "_bfpp_sharded"  # set on a model once its stages are sharded with FSDP2


class DataParallel(Protocol):
    """Everything the runtime and the executor ask of a data-parallel mode, at the points of the schedule that concern
    parameters and gradients."""

    enabled: bool
    """Whether :meth:`backward_done` reduces: off on batches that only accumulate gradients."""

    def run(self, stage: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs ``fn(*args)``, the forward of ``stage`` (under the mode's hooks)."""

    def gather(self, stage: int) -> None:
        """GATHER: start gathering ``stage``'s sharded parameters (the stage's compute waits for them)."""

    def reshard(self, stage: int) -> None:
        """RESHARD: free ``stage``'s gathered parameters."""

    def before_backward(self, stage: int, last: bool) -> None:
        """Right before a backward of ``stage``; ``last`` for its last micro-batch of the step."""

    def backward_done(self, stage: int) -> None:
        """REDUCE_GRAD: every backward of ``stage`` has run; start reducing its gradients."""

    def finish(self) -> None:
        """After the step: wait for the reductions and store the averaged gradients."""


def fsdp_mixed_precision(autocast_dtype: torch.dtype | None) -> Any:
    """With a mixed precision, FSDP gathers the parameters in the autocast dtype and reduces the gradients in float32;
    the stage inputs are left alone (autocast casts each operation's inputs, so the activations between layers keep the
    dtypes they have on one process). None (full precision) otherwise."""
    if autocast_dtype is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def data_parallel_for(
    sharding: str,
    model: nn.Module,
    stage_layers: dict[int, Sequence[nn.Module]],
    stage_params: dict[int, list[nn.Parameter]],
    group: dist.ProcessGroup | None,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> DataParallel:
    """Gradient averaging, or each local stage sharded with FSDP2 (once per model: a later run of the same model
    reuses the sharded stages)."""
    if sharding not in FSDP_MODES:
        return StageGradientReducer(stage_params, group)
    assert group is not None
    sharded = model.__dict__.get(SHARDED_ATTRIBUTE)
    if sharded is None:
        sharded = ShardedStages(stage_layers, group, device, fsdp_mixed_precision(autocast_dtype))
        model.__dict__[SHARDED_ATTRIBUTE] = sharded
    return sharded
