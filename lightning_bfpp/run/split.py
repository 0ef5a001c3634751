"""The split of a module by a partition: each layer's qualified name, and the layers of other ranks dropped."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_bfpp.plan.partition import Partition, PartitionError


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
