"""Gradient-norm clipping with the norm taken over every rank that holds a part of the model."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) gradient, or the gradient itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _sum_over(value: torch.Tensor, groups: Sequence[dist.ProcessGroup | None]) -> torch.Tensor:
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(value, group=group)
    return value


def global_grad_norm(
    params: Iterable[nn.Parameter],
    groups: Sequence[dist.ProcessGroup | None],
    not_counted: Collection[int] = (),
    shard_group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The 2-norm of all gradients of the model: local squares summed over each group in ``groups``. Parameters whose
    ``id`` is in ``not_counted`` (copies of a tied parameter that another rank counts) are left out. With
    ``shard_group`` (the group gradients are sharded over), the squares of sharded (DTensor) gradients are first
    summed over it. ``device``: where the sums live (the process group's device; default: the gradients')."""
    grads = [p.grad for p in params if p.grad is not None and id(p) not in not_counted]
    if device is None:
        device = _local(grads[0]).device if grads else torch.device("cpu")
    replicated = torch.zeros((), dtype=torch.float64, device=device)
    sharded = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        square = torch.linalg.vector_norm(_local(g), 2, dtype=torch.float64) ** 2
        if isinstance(g, DTensor):
            sharded += square
        else:
            replicated += square
    if shard_group is not None:
        sharded = _sum_over(sharded, [shard_group])
    return _sum_over(replicated + sharded, groups).sqrt().to(device)


def clip_grad_norm_global(
    params: Iterable[nn.Parameter],
    max_norm: float,
    groups: Sequence[dist.ProcessGroup | None],
    not_counted: Collection[int] = (),
    shard_group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Scales gradients in place as ``torch.nn.utils.clip_grad_norm_`` would on the unsplit model; returns the norm.
    ``not_counted``: ids of parameters scaled but left out of the norm; ``shard_group``: see
    :func:`global_grad_norm`."""
    params = [p for p in params if p.grad is not None]
    total = global_grad_norm(params, groups, not_counted, shard_group, device)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        _local(p.grad).mul_(coef.to(device=_local(p.grad).device, dtype=p.grad.dtype))
    return total
