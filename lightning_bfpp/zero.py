"""ZeRO-1: the optimizer state sharded over the data-parallel replicas with ``ZeroRedundancyOptimizer``.

The wrapper's parameter groups hold the options (learning rate, ...) that LR schedulers change; its local optimizer,
which holds this replica's state, gets them copied at each ``step()``. Checkpoints save and load the local optimizer,
so the options are copied to it before a save and back to the wrapper after a load.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.optim import Optimizer


def zero_optimizer(optimizer: Optimizer, group: dist.ProcessGroup | None) -> ZeroRedundancyOptimizer:
    """A ``ZeroRedundancyOptimizer`` of the same class, parameter groups and options as ``optimizer``: each replica
    keeps the state of its share of the parameters, steps it, and broadcasts the updated parameters."""
    groups = [{**g, "params": list(g["params"])} for g in optimizer.param_groups]
    defaults = _constructor_options(type(optimizer), optimizer.defaults)
    return ZeroRedundancyOptimizer(groups, optimizer_class=type(optimizer), process_group=group, **defaults)


def _constructor_options(optimizer_class: type[Optimizer], defaults: dict[str, Any]) -> dict[str, Any]:
    """The options of ``defaults`` that ``optimizer_class`` accepts: ``defaults`` may hold more (``AdamW`` keeps
    ``decoupled_weight_decay``, which its constructor does not take)."""
    parameters = inspect.signature(optimizer_class.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k in parameters}


def _zero(optimizer: Any) -> ZeroRedundancyOptimizer | None:
    optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer
    return optimizer if isinstance(optimizer, ZeroRedundancyOptimizer) else None


def _copy_options(sources: Sequence[dict[str, Any]], targets: Sequence[dict[str, Any]]) -> None:
    for source, target in zip(sources, targets, strict=True):
        target.update({k: v for k, v in source.items() if k != "params"})


def local_optimizer(optimizer: Any) -> Any:
    """The optimizer that holds this rank's state: the local one of a ``ZeroRedundancyOptimizer`` (given the wrapper's
    current options, e.g. a learning rate an LR scheduler changed since the last step), else itself."""
    zero = _zero(optimizer)
    if zero is None:
        return getattr(optimizer, "_optimizer", optimizer)
    _copy_options(zero.param_groups, zero.optim.param_groups)
    return zero.optim


def adopt_local_options(optimizer: Any) -> None:
    """After the local optimizer of a ``ZeroRedundancyOptimizer`` was loaded from a checkpoint: copies its restored
    options to the wrapper's parameter groups (``step()`` would otherwise overwrite them with the wrapper's)."""
    zero = _zero(optimizer)
    if zero is not None:
        _copy_options(zero.optim.param_groups, zero.param_groups)


def shard_optimizer_states(strategy: Any, group: dist.ProcessGroup | None) -> None:
    """Replaces each of ``strategy.optimizers`` with its ZeRO-1 version, re-pointing the LR schedulers to it."""
    replaced = {id(o): zero_optimizer(o, group) for o in strategy.optimizers}
    for config in strategy.lr_scheduler_configs:
        scheduler = config.scheduler
        if id(scheduler.optimizer) in replaced:
            scheduler.optimizer = replaced[id(scheduler.optimizer)]
    strategy.optimizers = [replaced[id(o)] for o in strategy.optimizers]
