"""Where the layer stack is cut: the partition, the layers' names and the tied weights, worked out on every rank
without communication (so that bad input raises on every rank before any collective)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from lightning_bfpp.options import PipelineOptions
from lightning_bfpp.partition import Partition, build_partition, layer_names
from lightning_bfpp.tied import Tie, check_ties_sharding, module_ties

SPLIT_ATTRIBUTE = "_bfpp_split"  # set on a module once its remote layers are dropped: (partition, layer names)


class PipelineModel(Protocol):
    """What the runtime needs of a model (an ``nn.Module``): its layer stack and how to run it."""

    def pipeline_layers(self) -> Sequence[nn.Module]:
        """The layers, in order; each is a submodule of the model."""
        ...

    def pipeline_input(self, batch: Any) -> Any:
        """The first layer's input, from a micro-batch."""
        ...

    def pipeline_layer_forward(self, index: int, layer: nn.Module, inputs: Any, batch: Any) -> Any:
        """Runs layer ``index`` on ``inputs`` (the previous layer's outputs); ``batch`` is the micro-batch."""
        ...


@dataclass(frozen=True)
class PipelineSplit:
    """How a model is cut: the partition of its layer stack, each layer's name in the unsplit model, and its ties."""

    partition: Partition
    layer_names: list[str]
    ties: list[Tie]


def plan_split(model: nn.Module, options: PipelineOptions, pipeline_size: int) -> PipelineSplit:
    """The split of ``model`` over ``pipeline_size`` ranks; a model that an earlier run already split keeps its
    split (its remote layers are gone), which must then have the same shape. Raises on bad input; no communication."""
    stages = pipeline_size * options.stages_per_rank
    split: tuple[Partition, list[str]] | None = model.__dict__.get(SPLIT_ATTRIBUTE)
    if split is not None:
        partition, names = split
        if partition.num_stages != stages or partition.pipeline_size != pipeline_size:
            raise ValueError(
                f"{type(model).__name__} was split into {partition.num_stages} stages over "
                f"{partition.pipeline_size} pipeline ranks by an earlier run: use the same pipeline_parallel_size and "
                "stages_per_rank, or load its checkpoint into a fresh module (`ckpt_path=...`)."
            )
    else:
        layers = list(model.pipeline_layers())  # type: ignore[operator]
        names = layer_names(model, layers)
        partition = build_partition(
            layers, pipeline_size, options.stages_per_rank, options.partition, options.partition_boundaries
        )
    ties = module_ties(model, names)  # tied weights, found before the split
    check_ties_sharding(ties, options.sharding, partition)
    return PipelineSplit(partition, names, ties)
