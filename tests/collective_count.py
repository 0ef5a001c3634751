"""Counts the all-gathers and reduce-scatters FSDP issues for each pipeline stage, by wrapping torch.distributed."""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup


def _issuing_group() -> FSDPParamGroup | None:
    frame = sys._getframe(2)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, FSDPParamGroup):
            return candidate
        frame = frame.f_back
    return None


def count_fsdp_collectives(strategy: Any, dtypes: Counter[tuple[str, str]] | None = None) -> Counter[tuple[str, int]]:
    """Installs the counting wrappers; the returned counter maps ``(collective, stage)`` to a count. ``dtypes``, if
    given, counts ``(collective, dtype of what this rank sends)``, e.g. ``("all_gather", "torch.bfloat16")``."""
    counts: Counter[tuple[str, int]] = Counter()

    def stage_of(group: FSDPParamGroup | None) -> int:
        for stage, shell in strategy._data_parallel.stages.items():
            if group is not None and group in shell._get_fsdp_state()._fsdp_param_groups:
                return stage
        return -1

    def counting(name: str, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[(name, stage_of(_issuing_group()))] += 1
            if dtypes is not None:
                dtypes[(name, str(kwargs.get("input", args[1] if len(args) > 1 else None).dtype))] += 1
            return original(*args, **kwargs)

        return wrapper

    dist.all_gather_single = counting("all_gather", dist.all_gather_single)
    dist.reduce_scatter_single = counting("reduce_scatter", dist.reduce_scatter_single)
    return counts
