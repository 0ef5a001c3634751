"""The process groups of a pipeline: this rank's pipeline and its data-parallel replicas."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from lightning_bfpp.run.process_groups import subgroups_by_enumeration


def ranks_of(world_size: int, pipeline_size: int, rank_layout: str) -> tuple[list[list[int]], list[list[int]]]:
    """The global ranks of every pipeline and of every data-parallel group. ``pp_contiguous``: the ranks of one
    pipeline are neighbours; ``dp_contiguous``: the replicas of one pipeline rank are."""
    P, D = pipeline_size, world_size // pipeline_size

    def rank_of(pp: int, dp: int) -> int:
        return pp * D + dp if rank_layout == "dp_contiguous" else dp * P + pp

    pipelines = [[rank_of(pp, dp) for pp in range(P)] for dp in range(D)]
    return pipelines, [[rank_of(pp, dp) for dp in range(D)] for pp in range(P)]


def layout_ranks(rank: int, world_size: int, pipeline_size: int, rank_layout: str) -> tuple[int, int]:
    """The pipeline rank and the data-parallel rank of global ``rank`` (see :func:`ranks_of`)."""
    replicas = world_size // pipeline_size
    if rank_layout == "dp_contiguous":
        return rank // replicas, rank % replicas
    return rank % pipeline_size, rank // pipeline_size


@dataclass(frozen=True)
class PipelineGroups:
    """This rank's pipeline group and data-parallel group, its rank in each, and the timeout of their collectives.

    Build it with :meth:`create` (every rank, once the default process group exists) or from groups of your own."""

    pipeline: dist.ProcessGroup | None
    data_parallel: dist.ProcessGroup | None
    pipeline_rank: int
    data_parallel_rank: int
    timeout: timedelta

    @property
    def pipeline_size(self) -> int:
        """``P``: the ranks of one pipeline."""
        return dist.get_world_size(self.pipeline) if self.pipeline is not None else 1

    @property
    def data_parallel_size(self) -> int:
        """``D``: the replicas."""
        return dist.get_world_size(self.data_parallel) if self.data_parallel is not None else 1

    @property
    def is_last_stage_rank(self) -> bool:
        """Whether this rank holds the last stage (and computes the loss)."""
        return self.pipeline_rank == self.pipeline_size - 1

    @classmethod
    def create(cls, pipeline_size: int, timeout: timedelta, rank_layout: str = "pp_contiguous") -> PipelineGroups:
        """Splits the default process group into pipelines of ``pipeline_size`` ranks and their replicas (a
        collective: every rank calls it)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % pipeline_size:
            raise ValueError(
                f"The world size {world} is not divisible by pipeline_parallel_size={pipeline_size}: choose a "
                f"pipeline_parallel_size that divides {world}."
            )
        pipelines, replicas = ranks_of(world, pipeline_size, rank_layout)
        pipeline = subgroups_by_enumeration(pipelines, timeout)  # reused by later fits of the same layout
        data_parallel = subgroups_by_enumeration(replicas, timeout)
        return cls(pipeline, data_parallel, *layout_ranks(rank, world, pipeline_size, rank_layout), timeout)
