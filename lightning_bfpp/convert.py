"""Converts a bfpp (sharded) checkpoint into an ordinary state dict or a one-file Lightning checkpoint.

Command::

    python -m lightning_bfpp.convert CHECKPOINT_DIR OUT.ckpt

writes ``OUT.ckpt`` with the unsplit module's ``state_dict`` and the trainer state from ``meta.pt`` (epoch, step,
hyper-parameters, callbacks, LR schedulers), so that ``Model.load_from_checkpoint("OUT.ckpt")`` (strict) works. It
runs in one process, without a process group, whatever layout wrote the checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_bfpp.run.checkpoint import META_FILENAME, is_sharded_checkpoint
from lightning_bfpp.run.checkpoint_files import (
    CheckpointError,
    SafeBytesLoading,
    SafeFileSystemReader,
    check_data_files,
    load_file,
    one_line_errors,
    read_dcp_metadata,
)
from lightning_bfpp.run.host_sync import host_tensor


def _load_keys(path: Path, key: str) -> dict[str, Any]:
    """Reads the entries under ``key`` of the DCP checkpoint at ``path`` into this process (no process group)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class Planner(SafeBytesLoading, _EmptyStateDictLoadPlanner):
        directory = path

    # What torch.distributed.checkpoint.format_utils.dcp_to_torch_save does, restricted to `key` and kept in memory.
    state: dict[str, Any] = {}
    metadata = read_dcp_metadata(path)
    check_data_files(path, metadata)
    reader = SafeFileSystemReader(path, metadata)
    with one_line_errors(path):
        _load_state_dict(state, storage_reader=reader, planner=Planner(keys={key}), no_dist=True)
    return state.get(key, {})


def _check(path: str | Path) -> Path:
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a bfpp checkpoint: expected a directory with DCP files and {META_FILENAME} (as written by "
            "BFPPStrategy, e.g. ModelCheckpoint's `epoch=0-step=10.ckpt` directory)."
        )
    return path


def to_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The model weights of the bfpp checkpoint directory ``path`` as one state dict of the unsplit module (every
    parameter and buffer under its own name, on CPU), ready for ``module.load_state_dict(..., strict=True)``.

    Runs in one process without a process group, whatever layout (``P``, ``L``, ``D``) wrote the checkpoint.
    """
    state = _load_keys(_check(path), "state_dict")
    return {name: host_tensor(value) if isinstance(value, Tensor) else value for name, value in state.items()}


def to_lightning_checkpoint(path: str | Path) -> dict[str, Any]:
    """The bfpp checkpoint directory ``path`` as a plain Lightning checkpoint dict: ``meta.pt`` (epoch, global step,
    hyper-parameters, loops, callbacks, LR schedulers) plus ``state_dict`` from :func:`to_state_dict`.

    The optimizer state is not included: the sharded checkpoint keys it by parameter name, a plain checkpoint by the
    position of the parameter in the optimizer. Resume a bfpp run from the directory to keep it; start a plain or a
    bfpp run from the converted file (``Model.load_from_checkpoint``) for a fresh optimizer.
    """
    path = _check(path)
    checkpoint = load_file(path / META_FILENAME)
    checkpoint.pop("optimizer_states", None)
    checkpoint["state_dict"] = to_state_dict(path)
    return checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_bfpp.convert",
        description="Convert a bfpp (sharded, DCP) checkpoint directory into one Lightning checkpoint file that the "
        "unsplit LightningModule loads with `Model.load_from_checkpoint(OUT)` (weights and trainer state, no "
        "optimizer state).",
    )
    parser.add_argument("src", help="the bfpp checkpoint directory (holds meta.pt and the .distcp files)")
    parser.add_argument("dst", help="the Lightning checkpoint file to write, e.g. model.ckpt")
    parser.add_argument("--weights-only", action="store_true", help="write only {'state_dict': ...} (no trainer state)")
    args = parser.parse_args(argv)
    try:
        checkpoint = {"state_dict": to_state_dict(args.src)} if args.weights_only else to_lightning_checkpoint(args.src)
    except (FileNotFoundError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    dst = Path(args.dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, dst)
    size = sum(v.numel() for v in checkpoint["state_dict"].values() if isinstance(v, Tensor))
    print(f"wrote {dst}: {len(checkpoint['state_dict'])} tensors, {size:,} values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
