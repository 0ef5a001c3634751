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
from torch.optim import LBFGS, Optimizer


def zero_optimizer(optimizer: Optimizer, group: dist.ProcessGroup | None) -> ZeroRedundancyOptimizer:
    """A ``ZeroRedundancyOptimizer`` of the same class, parameter groups and options as ``optimizer``: each replica
    keeps the state of its share of the parameters, steps it, and broadcasts the updated parameters.

    The local optimizer is built again from ``optimizer.defaults``: every constructor argument of the optimizer's
    class (a subclass's own included) must be stored there, or this raises. ``LBFGS`` is refused."""
    optimizer_class = type(optimizer)
    if issubclass(optimizer_class, LBFGS):
        raise ValueError(
            f"{optimizer_class.__name__} cannot be used with sharding='optimizer': its step evaluates the closure a "
            "number of times that depends on the local parameters, so the ranks, which hold different shards, would "
            "stop waiting for each other. Use a first-order optimizer (e.g. torch.optim.Adam or SGD), or "
            "sharding='none' with pipeline_parallel_size=1."
        )
    groups = [{**g, "params": list(g["params"])} for g in optimizer.param_groups]
    defaults = _constructor_options(optimizer_class, optimizer.defaults)
    return ZeroRedundancyOptimizer(groups, optimizer_class=optimizer_class, process_group=group, **defaults)


def _constructor_arguments(optimizer_class: type[Optimizer]) -> set[str]:
    """The keyword arguments the constructor of ``optimizer_class`` accepts: its own named ones, and, while a
    constructor takes ``**kwargs``, those of the next constructor up the class hierarchy (where they go)."""
    names: set[str] = set()
    for cls in optimizer_class.__mro__:
        if "__init__" not in vars(cls) or cls is Optimizer or cls is object:
            continue
        parameters = inspect.signature(cls.__init__).parameters
        names.update(k for k, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            break
    return names - {"self", "params"}


def _constructor_options(optimizer_class: type[Optimizer], defaults: dict[str, Any]) -> dict[str, Any]:
    """The options of ``defaults`` that ``optimizer_class`` accepts: ``defaults`` may hold more (``AdamW`` keeps
    ``decoupled_weight_decay``, which its constructor does not take). Raises if a constructor argument is missing
    from ``defaults``: its value cannot be recovered."""
    accepted = _constructor_arguments(optimizer_class)
    missing = sorted(accepted - defaults.keys())
    if missing:
        raise ValueError(
            f"sharding='optimizer' rebuilds {optimizer_class.__name__} from its `defaults`, which lack its constructor "
            f"argument(s) {missing}. Store them in `self.defaults` in {optimizer_class.__name__}.__init__ (e.g. "
            f"`self.defaults[{missing[0]!r}] = {missing[0]}`), or use sharding='none'."
        )
    return {k: v for k, v in defaults.items() if k in accepted}


def _zero(optimizer: Optimizer) -> ZeroRedundancyOptimizer | None:
    return optimizer if isinstance(optimizer, ZeroRedundancyOptimizer) else None


def _copy_options(sources: Sequence[dict[str, Any]], targets: Sequence[dict[str, Any]]) -> None:
    for source, target in zip(sources, targets, strict=True):
        target.update({k: v for k, v in source.items() if k != "params"})


def local_optimizer(optimizer: Optimizer) -> Optimizer:
    """The optimizer that holds this rank's state: the local one of a ``ZeroRedundancyOptimizer`` (given the wrapper's
    current options, e.g. a learning rate an LR scheduler changed since the last step), else itself."""
    zero = _zero(optimizer)
    if zero is None:
        return optimizer
    _copy_options(zero.param_groups, zero.optim.param_groups)
    return zero.optim


def adopt_local_options(optimizer: Optimizer) -> None:
    """After the local optimizer of a ``ZeroRedundancyOptimizer`` was loaded from a checkpoint: copies its restored
    options to the wrapper's parameter groups (``step()`` would otherwise overwrite them with the wrapper's)."""
    zero = _zero(optimizer)
    if zero is not None:
        _copy_options(zero.optim.param_groups, zero.param_groups)
