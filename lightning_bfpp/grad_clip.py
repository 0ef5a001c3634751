"""Gradient-norm clipping with the norm taken over every rank that holds a part of the model."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn


def global_grad_norm(params: Iterable[nn.Parameter], groups: Sequence[dist.ProcessGroup | None]) -> torch.Tensor:
    """The 2-norm of all gradients of the model: local squares summed over each group in ``groups``."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        squares = torch.stack([torch.linalg.vector_norm(g, 2, dtype=torch.float64) ** 2 for g in grads]).sum()
        device = grads[0].device
    else:
        squares, device = torch.zeros((), dtype=torch.float64), torch.device("cpu")
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(squares, group=group)
    return squares.sqrt().to(device)


def clip_grad_norm_global(
    params: Iterable[nn.Parameter], max_norm: float, groups: Sequence[dist.ProcessGroup | None]
) -> torch.Tensor:
    """Scales gradients in place as ``torch.nn.utils.clip_grad_norm_`` would on the unsplit model; returns the norm."""
    params = [p for p in params if p.grad is not None]
    total = global_grad_norm(params, groups)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return total
