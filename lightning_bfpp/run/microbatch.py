"""Splitting a batch into equal micro-batches."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def batch_size_of(batch: Any) -> int | None:
    """The leading dimension of the first tensor found in ``batch`` (None if it holds no tensor with a dimension)."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        items: Sequence[Any] = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = batch
    else:
        return None
    for item in items:
        size = batch_size_of(item)
        if size is not None:
            return size
    return None


def check_divisible(batch_size: int | None, num_micro_batches: int) -> None:
    """Raises a clear error unless the batch splits into ``num_micro_batches`` equal micro-batches."""
    if batch_size is None:
        raise ValueError("The batch holds no tensor with a batch dimension: bfpp splits batches along dimension 0.")
    if batch_size < num_micro_batches or batch_size % num_micro_batches:
        raise ValueError(
            f"A batch of {batch_size} samples does not split into micro_batches={num_micro_batches} equal parts: use a "
            f"batch size that is a multiple of {num_micro_batches} (and `drop_last=True` in the DataLoader so the last "
            "batch is full), or change micro_batches."
        )


def check_loader_batches(loader: Any, num_micro_batches: int) -> None:
    """Refuses a training data loader some of whose batches cannot split into ``num_micro_batches``, where the loader
    tells before the first batch: a ``batch_size`` that is not a multiple, or, with ``drop_last=False``, a smaller
    last batch (the sampler's length, per data-parallel replica, not a multiple of the batch size) that is not."""
    batch_size = getattr(loader, "batch_size", None)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool):
        return  # a batch sampler or an iterable dataset makes the batches: checked batch by batch
    check_divisible(batch_size, num_micro_batches)
    if getattr(loader, "drop_last", True):
        return
    try:
        samples = len(loader.sampler)
    except TypeError:  # a sampler without a length
        return
    last = samples % batch_size
    if last % num_micro_batches:
        raise ValueError(
            f"The training DataLoader's last batch holds {last} samples ({samples} per data-parallel replica, "
            f"batch_size={batch_size}), which does not split into micro_batches={num_micro_batches} equal parts: pass "
            f"drop_last=True to the DataLoader, or give it a multiple of {batch_size} samples per replica."
        )


def split_batch(batch: Any, num_micro_batches: int) -> list[Any]:
    """Splits every tensor whose leading dimension is the batch size into equal parts; other values are shared."""
    size = batch_size_of(batch)
    check_divisible(size, num_micro_batches)
    assert size is not None
    return [_take(batch, size, num_micro_batches, i) for i in range(num_micro_batches)]


def _take(value: Any, size: int, parts: int, index: int) -> Any:
    if isinstance(value, Tensor):
        if value.dim() == 0 or value.shape[0] != size:
            return value
        step = size // parts
        return value.narrow(0, index * step, step)
    if isinstance(value, Mapping):
        return type(value)({k: _take(v, size, parts, index) for k, v in value.items()})  # type: ignore[call-arg]
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_take(v, size, parts, index) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_take(v, size, parts, index) for v in value)
    return value


def batch_shapes_key(micro_batches: Sequence[Any]) -> Hashable:
    """What a step's micro-batches look like, from host metadata only (no device read): the dtype and shape of every
    tensor, and the values of ints, bools, strings and None (which may decide shapes); other values by type. Steps with
    equal keys are expected to give every stage outputs of equal shapes (see
    :class:`~lightning_bfpp.run.executor.PipelineExecutor`)."""
    return (len(micro_batches), *(_shapes_of(batch) for batch in micro_batches))


def _shapes_of(value: Any) -> Hashable:
    if isinstance(value, Tensor):
        return ("tensor", value.dtype, tuple(value.shape))
    if isinstance(value, Mapping):
        return ("map", *((key if isinstance(key, Hashable) else repr(key), _shapes_of(v)) for key, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_shapes_of(v) for v in value))
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return type(value).__qualname__


def merge_outputs(parts: list[Any]) -> Any:
    """Merges what a hook returned for each micro-batch into the batch's result: tensors with a batch
    dimension and lists are concatenated, scalar floating tensors and floats averaged, other scalars stacked, dicts
    and tuples merged entry by entry, equal other values kept once."""
    if not parts:
        return None
    first = parts[0]
    if len(parts) == 1 or first is None:
        return first
    if isinstance(first, Tensor):
        if first.dim() > 0:
            return torch.cat(parts)
        stacked = torch.stack(parts)
        return stacked.mean() if stacked.is_floating_point() else stacked
    if isinstance(first, Mapping):
        return type(first)({k: merge_outputs([p[k] for p in parts]) for k in first})  # type: ignore[call-arg]
    if isinstance(first, tuple):
        merged = [merge_outputs(list(items)) for items in zip(*parts, strict=True)]
        return type(first)(*merged) if hasattr(first, "_fields") else type(first)(merged)
    if isinstance(first, list):
        return [item for part in parts for item in part]
    if isinstance(first, float):
        return sum(parts) / len(parts)
    return first if all(p == first for p in parts) else list(parts)
