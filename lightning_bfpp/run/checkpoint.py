"""Sharded checkpoints of a pipelined module, and loading plain (one-file) Lightning checkpoints into one.

The format follows Lightning's ``ModelParallelStrategy``: a directory holding a ``torch.distributed.checkpoint``
(DCP) checkpoint plus ``meta.pt`` (rank 0), the non-tensor trainer state (loops, callbacks, LR schedulers,
hyper-parameters). In the DCP part:

- ``state_dict.<name>``: every parameter and buffer under its name in the unsplit module (``blocks.3.linear.weight``).
  Each pipeline rank writes the stages it holds; data-parallel replicas hold the same tensors under the same keys and
  DCP writes them once.
- ``optimizer_<i>.state.<name>.<key>`` and ``optimizer_<i>.param_groups.<name>.<option>``: the optimizer state
  flattened per parameter name (``StateDictOptions(flatten_optimizer_state_dict=True)``).

Nothing depends on ``P``, ``L`` or ``D``: a rank asks DCP for the keys of the parameters it holds, so a checkpoint
written with one layout loads into any other.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim import Optimizer

from lightning_bfpp.run.checkpoint_checks import META_FILENAME, check_before_loading, key_errors, mismatch_error
from lightning_bfpp.run.checkpoint_files import (
    CheckpointError,
    SafeFileSystemReader,
    SafeLoadPlanner,
    load_file,
    one_line_errors,
    save_error,
)
from lightning_bfpp.run.collectives import all_gather_objects
from lightning_bfpp.run.faults import is_communication_failure
from lightning_bfpp.run.tied import canonical_names
from lightning_bfpp.run.zero import local_optimizer

PARTIAL_SUFFIX = ".partial"  # `.<name>.partial`: a checkpoint being written (Lightning's search for `last` skips it)
OLD_SUFFIX = ".old"  # `.<name>.old`: the checkpoint being replaced, for the moment between two renames


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :func:`save_sharded` (DCP files plus ``meta.pt``, written last)."""
    path = Path(path)
    return path.is_dir() and (path / META_FILENAME).is_file()


def is_incomplete_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint directory whose writing did not finish (no ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and not (path / META_FILENAME).is_file()


def partial_path(path: Path) -> Path:
    """The hidden sibling where the checkpoint for ``path`` is written before it is renamed into place."""
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def model_state_dict(module: nn.Module) -> dict[str, Any]:
    """This rank's share of the module's state, under the names of the unsplit module."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options())


def optimizer_state_dict(module: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """The optimizer state of this rank's parameters, flattened and keyed by parameter name (a tied parameter under
    its canonical name, the one the unsplit module's ``named_parameters()`` reports)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    optimizer = local_optimizer(optimizer)  # ZeRO-1's local optimizer: this rank's share
    state = get_optimizer_state_dict(module, optimizer, options=_options(flatten_optimizer_state_dict=True))
    return _rename_parameters(state, canonical_names(module))


def _rename_parameters(state: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """Renames the parameter part of flattened optimizer keys (``state.<name>.<key>``, ``param_groups.<name>.<key>``)
    by ``names``."""
    if not names:
        return state
    renamed = {}
    for key, value in state.items():
        kind, _, rest = key.partition(".")
        for old, new in names.items():
            if rest.startswith(old + "."):
                key = f"{kind}.{new}.{rest[len(old) + 1 :]}"
                break
        renamed[key] = value
    return renamed


def clear_path(path: Path, is_global_zero: bool, barrier: Any) -> None:
    """Removes whatever is at ``path`` (file, link or directory) on rank 0, between barriers."""
    barrier()
    if is_global_zero:
        remove_path(path)
    barrier()


def remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def save_sharded_atomic(checkpoint: dict[str, Any], path: Path, is_global_zero: bool, barrier: Any) -> None:
    """Writes the checkpoint to :func:`partial_path` first; once every rank has written its part, rank 0 renames it to
    ``path``, replacing what was there. A process killed during the write leaves ``path`` as it was (and a partial
    directory that the next save removes and that is never loaded as a checkpoint). A write that fails on any rank
    (a full disk) raises the same one-line :class:`CheckpointError` on every rank, after rank 0 has removed the
    partial directory; ``path`` is left as it was."""
    partial = partial_path(path)
    barrier()
    if is_global_zero:
        remove_path(partial)  # a leftover of a save that was killed
    barrier()
    failure = None
    try:
        save_sharded(checkpoint, partial, is_global_zero)
    except (Exception, CheckpointException) as error:
        if is_communication_failure(error):
            raise  # a lost rank: the strategy names it
        failure = save_error(error, path, dist.get_rank() if dist.is_initialized() else 0)
    # every rank's files are written (meta.pt, by rank 0, is the last one), or some rank failed: all know which
    failures = [f for f in all_gather_objects(failure) if f is not None]
    if failures:
        if is_global_zero:
            remove_path(partial)
        barrier()
        raise CheckpointError(failures[0])
    if is_global_zero:
        replace_path(partial, path)
    barrier()


def replace_path(source: Path, target: Path) -> None:
    """Renames ``source`` to ``target``; a ``target`` that exists is moved aside first and removed after."""
    if not (target.exists() or target.is_symlink()):
        source.rename(target)
        return
    old = target.with_name(f".{target.name}{OLD_SUFFIX}")
    remove_path(old)
    target.rename(old)
    source.rename(target)
    remove_path(old)


def save_sharded(checkpoint: dict[str, Any], path: Path, is_global_zero: bool) -> None:
    """Writes ``checkpoint`` (a Lightning checkpoint dict whose ``state_dict`` and ``optimizer_states`` hold this
    rank's share, as returned by :func:`model_state_dict` and :func:`optimizer_state_dict`) to the directory
    ``path``. Every rank calls it; ``path`` must be empty or absent."""
    import torch.distributed.checkpoint as dcp

    checkpoint = dict(checkpoint)
    state: dict[str, Any] = {"state_dict": checkpoint.pop("state_dict")}
    for index, optimizer_state in enumerate(checkpoint.pop("optimizer_states", [])):
        state[f"optimizer_{index}"] = optimizer_state
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(state, checkpoint_id=path)
    if is_global_zero:  # meta.pt marks a complete checkpoint: written last, and whole or not at all
        torch.save(checkpoint, path / f"{META_FILENAME}.tmp")
        (path / f"{META_FILENAME}.tmp").replace(path / META_FILENAME)


def load_sharded(
    path: Path,
    module: nn.Module,
    optimizers: Sequence[Optimizer],
    strict: bool = True,
    weights_only: bool | None = None,
) -> dict[str, Any]:
    """Loads this rank's parameters (and optimizer states, when the checkpoint has them) from the sharded checkpoint
    at ``path``; returns the rest of the Lightning checkpoint (from ``meta.pt``). Every rank calls it.

    Before DCP reads anything, every rank checks the files (``.metadata``, ``meta.pt``, the size of each data file)
    and, with ``strict``, that the checkpoint's parameters and buffers are those of the module (every rank's together):
    a problem anywhere is one error, naming the file or the keys, raised on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    model_state = {"state_dict": model_state_dict(module)}
    metadata, rest = check_before_loading(path, sorted(model_state["state_dict"]), strict, weights_only)

    def reader() -> SafeFileSystemReader:
        return SafeFileSystemReader(path, metadata)

    planner = SafeLoadPlanner(path, allow_partial_load=not strict)
    with one_line_errors(path):
        dcp.load(model_state, storage_reader=reader(), planner=planner)
    module.load_state_dict(model_state["state_dict"], strict=strict)

    keys = set(metadata.state_dict_metadata)
    for index, optimizer in enumerate(optimizers):
        name = f"optimizer_{index}"
        if not any(key.startswith(name + ".") for key in keys):
            continue  # saved with weights only
        optimizer = local_optimizer(optimizer)
        optimizer_state = {name: optimizer_state_dict(module, optimizer)}
        planner = SafeLoadPlanner(path, allow_partial_load=not strict)
        with one_line_errors(path):
            dcp.load(optimizer_state, storage_reader=reader(), planner=planner)
        local_names = {canonical: local for local, canonical in canonical_names(module).items()}
        set_optimizer_state_dict(
            module,
            optimizer,
            optim_state_dict=_rename_parameters(optimizer_state[name], local_names),
            options=_options(flatten_optimizer_state_dict=True),
        )
    return rest


def load_plain(
    path: Path,
    module: nn.Module,
    optimizers: Sequence[Optimizer],
    group: dist.ProcessGroup | None,
    strict: bool = True,
    weights_only: bool | None = None,
) -> dict[str, Any]:
    """Loads a one-file Lightning checkpoint of the unsplit module into this rank's share of it.

    Each rank takes the entries it holds. With ``strict``, a parameter or buffer held by some rank but missing from the
    file, or an entry of the file that no rank holds, is an error naming it, raised on every rank. Optimizer states
    (keyed by parameter index in a plain checkpoint) are mapped through the unsplit module's parameter order, which
    is the order of the file's ``state_dict``; this assumes each parameter group lists its parameters in module order
    (as ``self.parameters()`` and filters of ``named_parameters()`` do), and is checked by group sizes and shapes.
    ``group`` spans every rank (None: the default group). Returns the rest of the checkpoint.
    """
    checkpoint = load_file(path, weights_only)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise KeyError(f"{path} is not a Lightning checkpoint: it has no 'state_dict'.")
    full: dict[str, Tensor] = checkpoint.pop("state_dict")
    local = module.state_dict()
    canonical = canonical_names(module)  # tied copies: the plain checkpoint's optimizer state uses the first name
    local_params = [canonical.get(name, name) for name, _ in module.named_parameters()]
    optimizer_states = checkpoint.pop("optimizer_states", None)
    param_names = {id(p): canonical.get(name, name) for name, p in module.named_parameters()}
    local_groups = [[[param_names[id(p)] for p in g["params"]] for g in o.param_groups] for o in optimizers]

    info = all_gather_objects((sorted(local), local_params, local_groups), group)
    held = set().union(*(set(keys) for keys, _, _ in info))
    errors = key_errors(held - set(full), set(full) - held) if strict else []
    if not errors:
        module.load_state_dict({k: like(v, local[k]) for k, v in full.items() if k in local}, strict=False)
        if optimizers and optimizer_states is not None:
            all_params = set().union(*(set(params) for _, params, _ in info))
            order = {name: i for i, name in enumerate(k for k in full if k in all_params)}
            errors += _load_plain_optimizers(optimizers, optimizer_states, local_groups, info, order, module)
    errors = sorted({e for rank_errors in all_gather_objects(errors, group) for e in rank_errors})
    if errors:
        raise mismatch_error(path, errors)
    return checkpoint


def like(value: Any, target: Tensor) -> Any:
    """``value`` (a whole tensor of the unsplit module, the same on every replica) laid out as ``target``: this
    replica's shard when ``target`` is sharded (a DTensor, ZeRO-2/3), else ``value`` itself. No communication."""
    if isinstance(target, DTensor) and isinstance(value, Tensor) and tuple(value.shape) == tuple(target.shape):
        value = value.to(device=target.device, dtype=target.dtype)
        return distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
    return value


def _load_plain_optimizers(
    optimizers: Sequence[Optimizer],
    states: list[dict[str, Any]],
    local_groups: list[list[list[str]]],
    info: list[Any],
    order: dict[str, int],
    module: nn.Module,
) -> list[str]:
    if len(states) != len(optimizers):
        return [f"the checkpoint has {len(states)} optimizer states, the module configures {len(optimizers)}"]
    canonical = canonical_names(module)
    params = {canonical.get(name, name): p for name, p in module.named_parameters()}
    errors = []
    for index, (optimizer, state) in enumerate(zip(optimizers, states, strict=True)):
        groups = state["param_groups"]
        if len(groups) != len(optimizer.param_groups):
            errors.append(f"optimizer {index} has {len(groups)} parameter groups in the checkpoint")
            continue
        local_state: dict[int, Any] = {}
        local_param_groups = []
        local_index = 0
        for g, group in enumerate(groups):
            # the unsplit group g: the union over the pipeline ranks, in the unsplit module's parameter order
            names = sorted({n for _, _, rank_groups in info for n in rank_groups[index][g]}, key=order.__getitem__)
            if len(names) != len(group["params"]):
                errors.append(
                    f"optimizer {index} group {g} has {len(group['params'])} parameters in the checkpoint and "
                    f"{len(names)} in the module"
                )
                break
            position = {name: i for i, name in enumerate(names)}
            indices = []
            for name in local_groups[index][g]:
                saved = state["state"].get(group["params"][position[name]])
                if saved is not None:
                    shapes = {tuple(v.shape) for v in saved.values() if isinstance(v, Tensor) and v.dim() > 0}
                    if shapes - {tuple(params[name].shape)}:
                        errors.append(f"optimizer {index}: the state saved for {name!r} has shapes {sorted(shapes)}")
                    local_state[local_index] = {k: like(v, params[name]) for k, v in saved.items()}
                indices.append(local_index)
                local_index += 1
            local_param_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
        else:
            if not errors:
                optimizer.load_state_dict({"state": local_state, "param_groups": local_param_groups})
    return errors
