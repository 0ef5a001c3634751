"""Strict loading and checkpoint errors, in-process (no process group): keys the module does not have, damaged or
missing files and a full disk each give one line naming the keys or the file and the cause; a failed save leaves no
partial directory and the previous checkpoint loadable. ``tests/test_checkpoint.py`` checks the same on two ranks.
"""

from __future__ import annotations

import subprocess
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_bfpp.convert import to_state_dict
from lightning_bfpp.run.checkpoint import (
    load_sharded,
    model_state_dict,
    optimizer_state_dict,
    save_sharded,
    save_sharded_atomic,
)
from lightning_bfpp.run.checkpoint_files import CheckpointError


def _module(names: tuple[str, ...] = ("first", "second", "third")) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict((name, nn.Linear(4, 4)) for name in names)).double()


def _checkpoint(module: nn.Module) -> dict:
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    module(torch.ones(1, 4, dtype=torch.float64)).sum().backward()
    optimizer.step()
    return {
        "state_dict": model_state_dict(module),
        "optimizer_states": [optimizer_state_dict(module, optimizer)],
        "epoch": 3,
    }


def _load(path: Path, module: nn.Module, strict: bool = True) -> dict:
    return load_sharded(path, module, [torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)], strict)


@pytest.mark.parametrize(
    ("saved", "loaded", "message"),
    [
        pytest.param(
            ("first", "second", "third", "fourth", "fifth"),
            ("first", "second", "third"),
            r"the module has no \['fifth.bias', 'fifth.weight', 'fourth.bias', 'fourth.weight'\]\.",
            id="deeper-into-shallower",
        ),
        pytest.param(
            ("first", "second", "third"),
            ("first", "middle", "third"),
            r"the checkpoint lacks \['middle.bias', 'middle.weight'\]; the module has no \['second.bias', 'second.",
            id="renamed-layer",
        ),
    ],
)
def test_strict_loading_refuses_keys_the_module_does_not_have(tmp_path: Path, saved, loaded, message) -> None:
    path = tmp_path / "checkpoint"
    save_sharded(_checkpoint(_module(saved)), path, is_global_zero=True)
    module = _module(loaded)
    before = {name: value.clone() for name, value in module.state_dict().items()}
    with pytest.raises(RuntimeError, match=f"Cannot load the checkpoint {path} into the pipelined module: {message}"):
        _load(path, module)
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed by a load that failed"
    # strict_loading=False: the matching entries
    assert _load(path, module, strict=False)["epoch"] == 3
    common = set(saved) & set(loaded)
    reference = _module(saved)
    _checkpoint(reference)
    for name, value in module.state_dict().items():
        if name.partition(".")[0] in common:
            assert torch.equal(value, reference.state_dict()[name]), name


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


DAMAGES = {
    # damage: (what it does to the checkpoint directory, the file named, the cause named)
    "truncated shard": (lambda p: _truncate(p / "__0_0.distcp"), "__0_0.distcp", "is truncated: it has"),
    "missing shard": (lambda p: (p / "__0_0.distcp").unlink(), "__0_0.distcp", "is missing"),
    "truncated meta.pt": (lambda p: _truncate(p / "meta.pt"), "meta.pt", "it is truncated or corrupted"),
    "truncated .metadata": (lambda p: _truncate(p / ".metadata"), ".metadata", "it is truncated or corrupted"),
    "missing .metadata": (lambda p: (p / ".metadata").unlink(), ".metadata", "is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_the_cause(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "checkpoint"
    save_sharded(_checkpoint(_module()), path, is_global_zero=True)
    apply, file, cause = DAMAGES[damage]
    apply(path)
    readers = {"resume": lambda: _load(path, _module())}
    if file != "meta.pt":  # the conversion to a state dict reads the DCP files only
        readers["convert"] = lambda: to_state_dict(path)
    for reader, read in readers.items():
        with pytest.raises(CheckpointError) as raised:
            read()
        message = str(raised.value)
        assert str(path / file) in message, (reader, message)
        assert cause in message and "\n" not in message, (reader, message)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root: CI runs as root), unmounted at the end."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def fill(path: Path) -> None:
    """Writes ``path`` until its file system has no space left."""
    with open(path, "wb", buffering=0) as stream:
        try:
            while True:
                stream.write(b"\0" * 4096)
        except OSError:
            pass


def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_previous_checkpoint(small_disk: Path) -> None:
    path = small_disk / "last.ckpt"
    saved = _module()
    save_sharded_atomic(_checkpoint(saved), path, is_global_zero=True, barrier=lambda: None)
    fill(small_disk / "filler")
    with pytest.raises(CheckpointError) as raised:
        save_sharded_atomic(_checkpoint(_module()), path, is_global_zero=True, barrier=lambda: None)
    message = str(raised.value)
    assert f"Cannot save the checkpoint {path}: global rank 0 failed to write its files: No space left on" in message
    assert "\n" not in message, message
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "last.ckpt"]  # no partial directory left
    module = _module()
    assert _load(path, module)["epoch"] == 3  # the previous checkpoint, whole
    for name, value in saved.state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name
