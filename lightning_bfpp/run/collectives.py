"""Picklable objects over process groups: a broadcast from one rank and an all-gather."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def relay(payload: Any, group: dist.ProcessGroup | None, src: int) -> Any:
    """Broadcasts a picklable ``payload`` from group rank ``src`` to every rank of ``group``."""
    if group is None or dist.get_world_size(group) == 1:
        return payload
    box = [payload]
    dist.broadcast_object_list(box, group=group, group_src=src)
    return box[0]


def all_gather_objects(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``obj``, in group rank order (just ``[obj]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
