"""ZeRO-1: the optimizer state sharded over the data-parallel replicas with ``ZeroRedundancyOptimizer``."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.optim import Optimizer


def zero_optimizer(optimizer: Optimizer, group: dist.ProcessGroup | None) -> ZeroRedundancyOptimizer:
    """A ``ZeroRedundancyOptimizer`` of the same class, parameter groups and options as ``optimizer``: each replica
    keeps the state of its share of the parameters, steps it, and broadcasts the updated parameters."""
    groups = [dict(g) for g in optimizer.param_groups]
    params = [{**g, "params": list(g["params"])} for g in groups]
    zero = ZeroRedundancyOptimizer(
        params, optimizer_class=type(optimizer), process_group=group, **optimizer.defaults
    )
    return zero


def local_optimizer(optimizer: Any) -> Any:
    """The optimizer that holds this rank's state: the local one of a ``ZeroRedundancyOptimizer`` (with the wrapper's
    current options, e.g. a learning rate an LR scheduler changed since the last step), else itself."""
    optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer
    if not isinstance(optimizer, ZeroRedundancyOptimizer):
        return optimizer
    for wrapper_group, local_group in zip(optimizer.param_groups, optimizer.optim.param_groups, strict=True):
        local_group.update({k: v for k, v in wrapper_group.items() if k != "params"})
    return optimizer.optim


def shard_optimizer_states(strategy: Any, group: dist.ProcessGroup | None) -> None:
    """Replaces each of ``strategy.optimizers`` with its ZeRO-1 version, re-pointing the LR schedulers to it."""
    replaced = {id(o): zero_optimizer(o, group) for o in strategy.optimizers}
    for config in strategy.lr_scheduler_configs:
        scheduler = config.scheduler
        if id(scheduler.optimizer) in replaced:
            scheduler.optimizer = replaced[id(scheduler.optimizer)]
    strategy.optimizers = [replaced[id(o)] for o in strategy.optimizers]


def adopt_local_options(optimizer: Any) -> None:
    """After the local optimizer of a ``ZeroRedundancyOptimizer`` was loaded from a checkpoint: copies its restored
    options (learning rate, ...) to the wrapper's parameter groups, which ``step()`` copies back to the local one."""
    optimizer = getattr(optimizer, "_optimizer", optimizer)
    if not isinstance(optimizer, ZeroRedundancyOptimizer):
        return
    for wrapper_group, local_group in zip(optimizer.param_groups, optimizer.optim.param_groups, strict=True):
        wrapper_group.update({k: v for k, v in local_group.items() if k != "params"})
