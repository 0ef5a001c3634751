"""Checks of a sharded checkpoint before it is loaded, agreed by every rank: its files are whole and, when loading
strictly, its keys are the module's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_bfpp.run.checkpoint_files import CheckpointError, check_data_files, load_file, read_dcp_metadata
from lightning_bfpp.run.collectives import all_gather_objects

META_FILENAME = "meta.pt"  # the name Lightning's ModelParallelStrategy uses too


def check_before_loading(
    path: Path, local_keys: list[str], strict: bool, weights_only: bool | None
) -> tuple[Any, dict[str, Any]]:
    """``(DCP metadata, meta.pt)`` of the checkpoint at ``path``, checked on every rank before DCP reads anything: the
    files (``.metadata``, ``meta.pt``, the size of each data file) and, with ``strict``, that the checkpoint's
    parameters and buffers are those of the module, every rank's share (``local_keys``) together, as
    ``load_state_dict(strict=True)`` checks them on one process. One all-gather carries each rank's problem with the
    files, if any, and its keys: a problem anywhere is the same error, naming the file or the keys, on every rank."""
    problem, metadata, rest = None, None, {}
    try:
        metadata = read_dcp_metadata(path)
        check_data_files(path, metadata)
        rest = load_file(path / META_FILENAME, weights_only)
    except CheckpointError as error:
        problem = str(error)
    gathered = all_gather_objects((problem, local_keys))
    problems = [p for p, _ in gathered if p is not None]
    if problems:
        raise CheckpointError(problems[0])
    if strict:
        held = set().union(*(set(keys) for _, keys in gathered))
        prefix = "state_dict."
        saved = {key[len(prefix) :] for key in metadata.state_dict_metadata if key.startswith(prefix)}
        errors = key_errors(held - saved, saved - held)
        if errors:
            raise mismatch_error(path, errors)
    return metadata, rest


def key_errors(missing: set[str], unexpected: set[str]) -> list[str]:
    """What ``load_state_dict(strict=True)`` would complain of, in a few names each."""

    def names(keys: set[str]) -> str:
        keys_ = sorted(keys)
        return f"{keys_[:10]}{' ...' if len(keys_) > 10 else ''}"

    errors = [f"the checkpoint lacks {names(missing)}"] if missing else []
    return errors + ([f"the module has no {names(unexpected)}"] if unexpected else [])


def mismatch_error(path: Path, errors: list[str]) -> RuntimeError:
    """The error of a strict load whose keys do not match (``errors`` from :func:`key_errors`)."""
    return RuntimeError(
        f"Cannot load the checkpoint {path} into the pipelined module: {'; '.join(errors)}. The file must be a "
        "checkpoint of the same (unsplit) LightningModule; set `strict_loading = False` on the module to load "
        "the matching entries only."
    )
