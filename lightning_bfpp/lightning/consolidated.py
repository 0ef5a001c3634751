"""One-file (consolidated) checkpoints: ``BFPPStrategy(save_distributed_checkpoint=False)``.

As ``ModelParallelStrategy(save_distributed_checkpoint=False)`` does, every rank hands its share of the model and of
the optimizer states to rank 0, which writes one ordinary Lightning checkpoint file: the ``state_dict`` of the unsplit
module (every parameter and buffer under its own name, on CPU, in the unsplit module's order) and each optimizer's
``state_dict()`` as one process running the unsplit module would have it (parameters numbered in module order, group
by group). ``Model.load_from_checkpoint(file)``, a one-process ``Trainer.fit(ckpt_path=file)`` and a ``bfpp`` run at
any layout load it.

:func:`checkpoint_source` lets ``PipelineModule.load_from_checkpoint`` read a sharded checkpoint directory too.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_bfpp.lightning.internals import unwrap_optimizer
from lightning_bfpp.run import checkpoint as bfpp_checkpoint
from lightning_bfpp.run.host_sync import host_tensor
from lightning_bfpp.run.split import RemoteLayer
from lightning_bfpp.run.tied import canonical_names
from lightning_bfpp.run.zero import local_optimizer

CONVERT_COMMAND = "python -m lightning_bfpp.convert"


class ConsolidatedCheckpoints:
    """Strategy methods that save one consolidated checkpoint file when ``save_distributed_checkpoint`` is False, and
    leave the sharded ones (:class:`~lightning_bfpp.lightning.checkpoints.ShardedCheckpoints`, after it in the bases)
    otherwise. Loading needs nothing new: the strategy loads a one-file checkpoint into any layout."""

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """With ``save_distributed_checkpoint=False``: the whole module's state on rank 0 (a collective; the other
        ranks get an empty dict)."""
        if self.options.save_distributed_checkpoint:  # type: ignore[attr-defined]
            return super().lightning_module_state_dict()  # type: ignore[misc]
        with self._explain_lost_rank("gathering the model state for a one-file checkpoint"):  # type: ignore[attr-defined]
            return gather_model_state(self.lightning_module, self.data_parallel_rank == 0)  # type: ignore[attr-defined]

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """With ``save_distributed_checkpoint=False``: the optimizer's state as one process would have it, on rank 0
        (a collective; the other ranks get an empty dict)."""
        if self.options.save_distributed_checkpoint:  # type: ignore[attr-defined]
            return super().optimizer_state(optimizer)  # type: ignore[misc]
        with self._explain_lost_rank("gathering the optimizer state for a one-file checkpoint"):  # type: ignore[attr-defined]
            return gather_optimizer_state(
                self.lightning_module,  # type: ignore[attr-defined]
                unwrap_optimizer(optimizer),
                self.data_parallel_rank == 0,  # type: ignore[attr-defined]
            )

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """With ``save_distributed_checkpoint=False``: rank 0 writes ``checkpoint`` to the file ``filepath`` through
        the strategy's ``CheckpointIO`` (a sharded checkpoint directory there is removed first); otherwise the
        sharded directory."""
        if self.options.save_distributed_checkpoint:  # type: ignore[attr-defined]
            super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]
            return
        path = Path(self.broadcast(str(filepath)))  # type: ignore[attr-defined]
        existing = self.broadcast(_existing(path) if self.is_global_zero else None)  # type: ignore[attr-defined]
        if existing == "directory":
            raise IsADirectoryError(
                f"Cannot write the one-file checkpoint {path}: a directory that is not a checkpoint is there. Remove "
                "it or choose another path."
            )
        if existing == "sharded":  # replaced, as ModelParallelStrategy does
            bfpp_checkpoint.clear_path(path, self.is_global_zero, self.barrier)  # type: ignore[attr-defined]
        if self.is_global_zero:  # type: ignore[attr-defined]
            self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)  # type: ignore[attr-defined]


def _existing(path: Path) -> str | None:
    """What is at ``path``: None (nothing, or a file), ``"sharded"`` (a sharded checkpoint, complete or not) or
    ``"directory"`` (any other directory)."""
    if not path.is_dir():
        return None
    if bfpp_checkpoint.is_sharded_checkpoint(path) or (path / ".metadata").exists() or any(path.glob("*.distcp")):
        return "sharded"
    return "directory"


# ------------------------------------------------------------------------------------------------ gathering
def _gather_to_zero(payload: Any) -> list[Any] | None:
    """Every rank's ``payload`` on global rank 0 (in rank order), None elsewhere; ``[payload]`` without a process
    group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [payload]
    received: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(payload, received, dst=0)
    return received


def _whole(value: Any) -> Any:
    """A tensor as a whole CPU tensor (a sharded ``DTensor`` is gathered over its replicas: a collective); other
    values as they are."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    if isinstance(value, Tensor):
        return host_tensor(value.detach())
    return value


def gather_model_state(module: nn.Module, send: bool) -> dict[str, Any]:
    """The state dict of the unsplit module on global rank 0, in its order; ``{}`` elsewhere. Every rank calls it;
    the ranks with ``send`` (one replica of each pipeline rank) contribute their stages."""
    local = {name: _whole(value) for name, value in module.state_dict().items()}  # sharded tensors: all replicas
    received = _gather_to_zero(local if send else None)
    if received is None:
        return {}
    merged: dict[str, Any] = {}
    for state in received:
        for name, value in (state or {}).items():
            merged.setdefault(name, value)  # tied copies and buffers outside the stack: the first rank's
    return {name: merged[name] for name in unsplit_order(module, merged)}


def gather_optimizer_state(module: nn.Module, optimizer: Optimizer, send: bool) -> dict[str, Any]:
    """``optimizer.state_dict()`` as one process running the unsplit module would return it, on global rank 0;
    ``{}`` elsewhere. Every rank calls it.

    Parameters are numbered in the unsplit module's order within each group, group after group: the numbering of an
    optimizer built from ``self.parameters()`` (or from filters of ``named_parameters()``), as the strategy's loading
    of a one-file checkpoint assumes too. ZeRO-1 replicas each contribute the state of their share."""
    local = local_optimizer(optimizer)
    canonical = canonical_names(module)
    names = {id(p): canonical.get(name, name) for name, p in module.named_parameters()}
    param_names = list(names.values())  # this rank's parameters in its module order
    groups = []
    for group in local.param_groups:  # sharded states (ZeRO-2/3): gathered on every replica, in the same order
        entries = [(names[id(p)], {k: _whole(v) for k, v in local.state.get(p, {}).items()}) for p in group["params"]]
        groups.append(({k: v for k, v in group.items() if k != "params"}, entries))
    send = send or local is not optimizer  # ZeRO-1: every replica holds the state of a different share
    received = _gather_to_zero((param_names, groups) if send else None)
    if received is None:
        return {}
    received = [r for r in received if r is not None]
    order = unsplit_order(module, [name for rank_names, _ in received for name in rank_names])
    return _one_process_state([groups for _, groups in received], {name: i for i, name in enumerate(order)})


def _one_process_state(received: list[list[Any]], position: dict[str, int]) -> dict[str, Any]:
    state: dict[int, Any] = {}
    param_groups = []
    index = 0
    for g, first in enumerate(received[0]):
        ranks = [groups[g] for groups in received]
        options = next((options for options, entries in ranks if entries), first[0])
        entries: dict[str, dict[str, Any]] = {}
        for _, rank_entries in ranks:
            for name, value in rank_entries:
                entries.setdefault(name, value)  # a tied parameter: the first rank's copy (they are equal)
        params = []
        for name in sorted(entries, key=position.__getitem__):
            if entries[name]:
                state[index] = entries[name]
            params.append(index)
            index += 1
        param_groups.append({**options, "params": params})
    return {"state": state, "param_groups": param_groups}


# ------------------------------------------------------------------------------------------------ key order
def unsplit_order(module: nn.Module, keys: Iterable[str]) -> list[str]:
    """``keys`` (names in the unsplit module, from every rank, each rank's in its ``state_dict()`` order) in the order
    of the unsplit module's ``state_dict()``. ``module`` is this rank's split module: a placeholder
    (:class:`~lightning_bfpp.run.split.RemoteLayer`) stands where another rank's layer was, and takes that layer's
    keys. Keys that belong to no module of the walk (renamed by a state-dict hook) come last, in the order given."""
    keys = list(dict.fromkeys(keys))
    modules = list(module.named_modules(remove_duplicate=False))
    remote = {name for name, child in modules if isinstance(child, RemoteLayer)}
    by_module: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split(".")
        owner = next((p for i in range(1, len(parts)) if (p := ".".join(parts[:i])) in remote), None)
        by_module.setdefault(owner if owner is not None else key.rpartition(".")[0], []).append(key)
    ordered: list[str] = []
    for name, _ in modules:  # depth first, each module's own entries before its children's, as state_dict()
        ordered.extend(by_module.pop(name, []))
    ordered += [key for rest in by_module.values() for key in rest]
    return list(dict.fromkeys(ordered))


# ------------------------------------------------------------------------------------------------ loading a directory
def checkpoint_source(checkpoint_path: Any, weights_only: bool | None) -> Any:
    """What ``load_from_checkpoint`` reads for ``checkpoint_path``: a sharded (bfpp) checkpoint directory converted in
    memory to a one-file checkpoint (its weights and ``meta.pt``, no optimizer state); anything else as it is."""
    if not isinstance(checkpoint_path, (str, Path)) or str(checkpoint_path).startswith(("http:", "https:")):
        return checkpoint_path
    path = Path(checkpoint_path)
    if not path.is_dir():
        return checkpoint_path
    if not bfpp_checkpoint.is_sharded_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is a directory, not a checkpoint file: a bfpp checkpoint directory holds "
            f"{bfpp_checkpoint.META_FILENAME} (written last; without it the save did not finish). Give a checkpoint "
            f"file, or convert a complete bfpp directory with `{CONVERT_COMMAND} {path} model.ckpt`."
        )
    from lightning_bfpp.convert import to_state_dict

    checkpoint = torch.load(path / bfpp_checkpoint.META_FILENAME, map_location="cpu", weights_only=weights_only)
    checkpoint.pop("optimizer_states", None)
    checkpoint["state_dict"] = to_state_dict(path)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return buffer
