"""Parameters shared by layers of different pipeline stages (tied weights), e.g. a token embedding on the first stage
whose weight the LM head of the last stage reuses.

Declare a tie as on one process, by assigning the same ``nn.Parameter`` to both layers
(``self.head.weight = self.embedding.weight``): :func:`find_ties` sees it by identity before the layers of other
ranks are dropped. A layer that uses another layer's weight must hold it as its own parameter (not read it through
the other layer in ``forward``), since the other layer may live on another rank.

After the split, every pipeline rank that holds a layer of the tie keeps its own copy. :class:`TiedGradients` sums
the copies' gradients over those ranks after the backward of each optimizer step, so every copy gets the gradient
of the unsplit module and the same update; the copies start equal (broadcast from the rank of the tie's first layer)
and stay equal. The first name of a tie (the one ``named_parameters()`` of the unsplit module reports) is its
canonical name: gradient clipping counts the tie once, and optimizer states are stored under that name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor

from lightning_bfpp.plan.partition import Partition
from lightning_bfpp.run.collectives import all_gather_objects
from lightning_bfpp.run.process_groups import subgroups_by_enumeration

TIES_ATTRIBUTE = "_bfpp_ties"  # set on a module when its ties are found: list[Tie]
ALIASES_ATTRIBUTE = "_bfpp_tied_aliases"  # set on a split module: {local name: canonical name} of its tied copies


@dataclass(frozen=True)
class Tie:
    """One parameter under several names of the unsplit module; ``names[0]`` is the canonical one."""

    names: tuple[str, ...]
    layers: tuple[int, ...]  # the layer index of each name

    @property
    def canonical(self) -> str:
        return self.names[0]


def find_ties(root: nn.Module, layer_names: Sequence[str]) -> list[Tie]:
    """The parameters of ``root`` reachable under several names in different layers (by identity)."""
    names_of: dict[int, list[str]] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    ties = []
    for names in names_of.values():
        inside = [(name, layer) for name in names if (layer := _layer_of(name, layer_names)) >= 0]
        if len({layer for _, layer in inside}) > 1:
            ties.append(Tie(tuple(n for n, _ in inside), tuple(layer for _, layer in inside)))
    return ties


def module_ties(module: nn.Module, layer_names: Sequence[str]) -> list[Tie]:
    """The ties of ``module``: found once, while every layer is still there, and kept on the module for later runs."""
    ties = module.__dict__.get(TIES_ATTRIBUTE)
    if ties is None:
        ties = module.__dict__[TIES_ATTRIBUTE] = find_ties(module, layer_names)
    return ties


def _layer_of(name: str, layer_names: Sequence[str]) -> int:
    for index, layer in enumerate(layer_names):
        if name.startswith(layer + "."):
            return index
    return -1  # outside the stack


def check_ties_sharding(ties: Sequence[Tie], sharding: str, partition: Partition) -> None:
    """With sharded parameters (``gradients``, ``full``), each stage is one FSDP group, so the layers of a tie must
    lie on different pipeline ranks (one copy per rank)."""
    if sharding in ("none", "optimizer"):
        return
    for tie in ties:
        for rank in range(partition.pipeline_size):
            local = local_names(tie, partition, rank)
            if len(local) > 1:
                raise ValueError(
                    f"The tied parameters {local} lie in two stages of pipeline rank {rank}, which sharding="
                    f"{sharding!r} cannot shard twice: place the tied layers on different pipeline ranks (another "
                    "pipeline_parallel_size, stages_per_rank or partition), or use sharding='none' or 'optimizer'."
                )


def stage_of_layers(partition: Partition) -> dict[int, int]:
    return {layer: stage for stage in range(partition.num_stages) for layer in partition.layers_of(stage)}


def holders(tie: Tie, partition: Partition) -> tuple[int, ...]:
    """The pipeline ranks holding a copy of ``tie``; the first holds its first layer."""
    stage_of = stage_of_layers(partition)
    ranks: list[int] = []
    for layer in sorted(tie.layers):
        rank = partition.rank_of(stage_of[layer])
        if rank not in ranks:
            ranks.append(rank)
    return tuple(ranks)


def local_names(tie: Tie, partition: Partition, rank: int) -> list[str]:
    """The names of ``tie`` inside the layers pipeline ``rank`` holds."""
    stage_of = stage_of_layers(partition)
    return [n for n, layer in zip(tie.names, tie.layers, strict=True) if partition.rank_of(stage_of[layer]) == rank]


def local_aliases(ties: Sequence[Tie], partition: Partition, rank: int) -> dict[str, str]:
    """``{local name: canonical name}`` for the tied parameters pipeline ``rank`` holds under a non-canonical name
    only (after the split, ``named_parameters()`` reports the first name it still reaches)."""
    aliases = {}
    for tie in ties:
        local = local_names(tie, partition, rank)
        if local and local[0] != tie.canonical:
            aliases[local[0]] = tie.canonical
    return aliases


def set_aliases(module: nn.Module, ties: Sequence[Tie], partition: Partition, rank: int) -> None:
    """Records on the split ``module`` the canonical names of the tied copies it holds under other names (read by
    :func:`canonical_names` when checkpoints name optimizer states)."""
    module.__dict__[ALIASES_ATTRIBUTE] = local_aliases(ties, partition, rank)


def canonical_names(module: nn.Module) -> dict[str, str]:
    """``{local name: canonical name}`` of the tied copies ``module`` holds under another name (empty if none)."""
    return dict(module.__dict__.get(ALIASES_ATTRIBUTE, {}))


def dedupe_stage_parameters(stage_params: dict[int, list[nn.Parameter]]) -> dict[int, list[nn.Parameter]]:
    """Keeps a parameter shared by several local stages in the lowest of them only: its last backward is the rank's
    last, so a data-parallel reduction started there sees the whole gradient."""
    seen: set[int] = set()
    out: dict[int, list[nn.Parameter]] = {}
    for stage in sorted(stage_params):
        out[stage] = []
        for p in stage_params[stage]:
            if id(p) not in seen:
                seen.add(id(p))
                out[stage].append(p)
    return out


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class TiedGradients:
    """Sums the gradients of tied copies over the pipeline ranks that hold them, one bucket per set of ranks.

    Built on every rank in the same order, after the split: it creates one process group per set of pipeline ranks
    that share ties (one per data-parallel replica), with every rank taking part.

    Arguments:
        module: the split module (remote layers dropped).
        ties: the module's ties (the same on every rank).
        partition: the partition of the layer stack.
        pipeline_rank: this rank's pipeline rank.
        pp_group: this rank's pipeline process group.
        timeout: timeout of the groups' collectives.
    """

    def __init__(
        self,
        module: nn.Module,
        ties: Sequence[Tie],
        partition: Partition,
        pipeline_rank: int,
        pp_group: dist.ProcessGroup | None,
        timeout: timedelta,
    ) -> None:
        # Parameters are looked up by name when used: sharding (FSDP) replaces them after this set-up.
        self._module = module
        params = dict(module.named_parameters(remove_duplicate=False))
        by_ranks: dict[tuple[int, ...], list[Tie]] = {}
        self._not_counted: list[str] = []  # local copies that gradient clipping must not count
        for tie in ties:
            ranks = holders(tie, partition)
            if len(ranks) > 1:
                by_ranks.setdefault(tuple(sorted(ranks)), []).append(tie)
            if pipeline_rank in ranks and ranks[0] != pipeline_rank:
                self._not_counted += [n for n in tie.names if n in params]
        self._copies: list[tuple[dist.ProcessGroup, str, int]] = []  # (group, local copy's name, source rank)
        self._buckets: list[tuple[dist.ProcessGroup, list[str]]] = []
        if not by_ranks:
            return
        mine = dist.get_process_group_ranks(pp_group) if pp_group is not None else [dist.get_rank()]
        pipelines = sorted({tuple(r) for r in all_gather_objects(mine)})
        for ranks, group_ties in sorted(by_ranks.items()):
            group = subgroups_by_enumeration([[pipeline[r] for r in ranks] for pipeline in pipelines], timeout)
            if pipeline_rank not in ranks:
                continue
            for tie in group_ties:
                local = local_names(tie, partition, pipeline_rank)[0]
                self._copies.append((group, local, mine[holders(tie, partition)[0]]))
            self._buckets.append((group, [n for g, n, _ in self._copies if g is group and params[n].requires_grad]))

    @property
    def active(self) -> bool:
        return bool(self._copies)

    @torch.no_grad()
    def not_counted(self) -> set[int]:
        """Ids of the local copies that gradient clipping must not count (another rank counts the tie)."""
        return {id(self._module.get_parameter(n)) for n in self._not_counted}

    def broadcast_from_first(self) -> None:
        """Makes every copy equal to the copy on the rank of the tie's first layer (a sharded copy: shard by shard,
        the replicas of every holding rank having the same shard)."""
        for group, name, source in self._copies:
            dist.broadcast(_local(self._module.get_parameter(name).data), src=source, group=group)

    @torch.no_grad()
    def sum_gradients(self) -> None:
        """Sums the gradients of the local copies over the ranks holding the other copies (a missing gradient
        counts as zero)."""
        for group, names in self._buckets:
            if not names:
                continue
            params = [self._module.get_parameter(n) for n in names]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [_local(p.grad) for p in params]  # a sharded gradient: this replica's shard, the same on each copy
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                grad.copy_(summed)
