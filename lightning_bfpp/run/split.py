"""Where the layer stack is cut: the partition, the layers' names and the tied weights, worked out on every rank
without communication (so that bad input raises on every rank before any collective); and the cut itself, the
layers of other ranks replaced by placeholders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from lightning_bfpp.options import PipelineOptions
from lightning_bfpp.plan.partition import Partition, PartitionError, build_partition
from lightning_bfpp.run.tied import Tie, check_ties_sharding, module_ties

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
