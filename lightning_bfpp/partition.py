"""Layers to stages (uniform, by parameter count, or explicit), and stage to pipeline rank (looped placement)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

PARTITIONS = ("uniform", "parameters", "explicit")


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
    layers: Sequence[nn.Module],
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


def layer_names(root: nn.Module, layers: Sequence[nn.Module]) -> list[str]:
    """The qualified name of each layer inside ``root``; checks that every parameter lies in exactly one layer."""
    names_by_id = {id(module): name for name, module in root.named_modules(remove_duplicate=False)}
    names = []
    for index, layer in enumerate(layers):
        if id(layer) not in names_by_id or layer is root:
            raise PartitionError(
                f"pipeline_layers()[{index}] ({type(layer).__name__}) is not a submodule of {type(root).__name__}: "
                "return the module's own layers (e.g. `self.layers`), assigned as attributes in __init__."
            )
        names.append(names_by_id[id(layer)])
    if len(set(names)) != len(names):
        raise PartitionError("pipeline_layers() lists a layer twice: every layer must appear once.")
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if b.startswith(a + ".") or a.startswith(b + "."):
                raise PartitionError(f"pipeline_layers() lists {a!r} and {b!r}, one inside the other.")
    covered = {id(p) for layer in layers for p in layer.parameters()}
    outside = [name for name, p in root.named_parameters() if id(p) not in covered]
    if outside:
        raise PartitionError(
            f"Parameters {outside[:5]} are not inside any of pipeline_layers(): every parameter must belong to a "
            "layer of the stack (move it into the first or last layer)."
        )
    return names


class RemoteLayer(nn.Module):
    """Stands in for a layer that lives on another pipeline rank; holds no parameters."""

    def __init__(self, stage: int, rank: int) -> None:
        super().__init__()
        self.stage, self.rank = stage, rank

    def forward(self, *args: object) -> None:
        raise RuntimeError(f"This layer belongs to stage {self.stage} on pipeline rank {self.rank}, not to this rank.")

    def extra_repr(self) -> str:
        return f"stage={self.stage}, pipeline_rank={self.rank}"


def drop_remote_layers(root: nn.Module, names: Sequence[str], partition: Partition, rank: int) -> None:
    """Replaces every layer not owned by pipeline ``rank`` with a :class:`RemoteLayer`, keeping global names."""
    for stage in range(partition.num_stages):
        owner = partition.rank_of(stage)
        if owner == rank:
            continue
        for index in partition.layers_of(stage):
            parent_name, _, attr = names[index].rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, attr, RemoteLayer(stage, owner))
