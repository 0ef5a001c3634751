"""Layers to stages (uniform, by parameter count, or explicit), and stage to pipeline rank (looped placement)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

PARTITIONS = ("uniform", "parameters", "explicit")


class HasParameters(Protocol):
    """A layer: anything with ``parameters()`` (an ``nn.Module``)."""

    def parameters(self) -> Iterable[Any]: ...


class PartitionError(ValueError):
    """A partition that cannot be built from the given layers and options."""


@dataclass(frozen=True)
class Partition:
    """Stage ``s`` holds layers ``boundaries[s]:boundaries[s+1]`` and runs on pipeline rank ``s % pipeline_size``."""

    boundaries: tuple[int, ...]
    pipeline_size: int

    @property
    def num_stages(self) -> int:
        return len(self.boundaries) - 1

    def layers_of(self, stage: int) -> range:
        return range(self.boundaries[stage], self.boundaries[stage + 1])

    def rank_of(self, stage: int) -> int:
        return stage % self.pipeline_size

    def stages_of(self, rank: int) -> list[int]:
        return list(range(rank, self.num_stages, self.pipeline_size))

    def describe(self) -> str:
        return ", ".join(
            f"stage {s} (rank {self.rank_of(s)}): layers {self.boundaries[s]}-{self.boundaries[s + 1] - 1}"
            for s in range(self.num_stages)
        )


def uniform_boundaries(num_layers: int, num_stages: int) -> list[int]:
    """Equal layer counts; the first ``num_layers % num_stages`` stages get one layer more."""
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    return bounds


def balanced_boundaries(costs: Sequence[int], num_stages: int) -> list[int]:
    """Contiguous split of ``costs`` into ``num_stages`` non-empty parts minimising the largest part's sum."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: smallest achievable maximum when the first i layers form k stages; cut[k][i]: where stage k starts.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for k in range(1, num_stages + 1):
        for i in range(k, n - (num_stages - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds = [n]
    for k in range(num_stages, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]


def build_partition(
    layers: Sequence[HasParameters],
    pipeline_size: int,
    stages_per_rank: int,
    method: str = "uniform",
    boundaries: Sequence[int] | None = None,
) -> Partition:
    """Splits ``layers`` into ``pipeline_size * stages_per_rank`` stages by ``method``."""
    num_layers, num_stages = len(layers), pipeline_size * stages_per_rank
    if num_stages > num_layers:
        raise PartitionError(
            f"pipeline_parallel_size * stages_per_rank = {pipeline_size} * {stages_per_rank} = {num_stages} stages, "
            f"but the module has only {num_layers} layers: lower pipeline_parallel_size or stages_per_rank so that "
            f"there are at most {num_layers} stages."
        )
    if method == "uniform":
        bounds = uniform_boundaries(num_layers, num_stages)
    elif method == "parameters":
        costs = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        bounds = balanced_boundaries(costs, num_stages)
    elif method == "explicit":
        bounds = _check_explicit(boundaries, num_layers, num_stages)
    else:
        raise PartitionError(f"Unknown partition {method!r}: choose one of {', '.join(PARTITIONS)}.")
    return Partition(tuple(bounds), pipeline_size)


def _check_explicit(boundaries: Sequence[int] | None, num_layers: int, num_stages: int) -> list[int]:
    example = uniform_boundaries(num_layers, num_stages)
    if boundaries is None:
        raise PartitionError(f"partition='explicit' needs partition_boundaries, e.g. {example}.")
    bounds = list(boundaries)
    valid = (
        len(bounds) == num_stages + 1
        and bounds[0] == 0
        and bounds[-1] == num_layers
        and all(a < b for a, b in itertools.pairwise(bounds))
    )
    if not valid:
        raise PartitionError(
            f"partition_boundaries={bounds} must be {num_stages + 1} strictly increasing layer indices from 0 to "
            f"{num_layers} (one stage between consecutive entries, every layer covered), e.g. {example}."
        )
    return bounds
