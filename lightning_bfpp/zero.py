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
    """The optimizer that holds this rank's state: the local one of a ``ZeroRedundancyOptimizer``, else itself."""
    optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def shard_optimizer_states(strategy: Any, group: dist.ProcessGroup | None) -> None:
    """Replaces each of ``strategy.optimizers`` with its ZeRO-1 version, re-pointing the LR schedulers to it."""
    replaced = {id(o): zero_optimizer(o, group) for o in strategy.optimizers}
    for config in strategy.lr_scheduler_configs:
        scheduler = config.scheduler
        if id(scheduler.optimizer) in replaced:
            scheduler.optimizer = replaced[id(scheduler.optimizer)]
    strategy.optimizers = [replaced[id(o)] for o in strategy.optimizers]
