"""No checkpoint file runs code: a payload planted in any file that a reader of checkpoints reads is refused, with an
error naming the file, and never runs. In-process, on a checkpoint written by ``save_sharded`` without a process group.

The payload is a pickled object whose ``__reduce__`` makes a marker directory; it is planted in ``.metadata`` (DCP's
metadata), in a shard (a non-tensor value and a tensor), in ``meta.pt``, in a one-file Lightning checkpoint and in a
LitGPT ``lit_model.pth``, and read by resume (``load_sharded``, ``load_plain``), ``python -m lightning_bfpp.convert``,
and both adapters' loaders and exporters.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_bfpp.run.checkpoint import load_plain, load_sharded, model_state_dict, optimizer_state_dict, save_sharded
from lightning_bfpp.run.checkpoint_files import CheckpointError


class Payload:
    """Makes the directory ``marker`` when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.mkdir, (str(self.marker),))


def _module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()


def _optimizer(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(module.parameters(), lr=0.1)


def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    module = _module()
    optimizer = _optimizer(module)
    module(torch.ones(2, 3, dtype=torch.float64)).sum().backward()
    optimizer.step()
    return module, optimizer


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A sharded checkpoint (weights, Adam state, trainer state) and a plain one-file checkpoint beside it."""
    module, optimizer = _trained()
    state = {
        "state_dict": model_state_dict(module),
        "optimizer_states": [optimizer_state_dict(module, optimizer)],
        "epoch": 1,
        "hyper_parameters": {"width": 4},
    }
    path = tmp_path / "sharded.ckpt"
    save_sharded(state, path, is_global_zero=True)
    torch.save({"state_dict": module.state_dict(), "epoch": 1}, tmp_path / "plain.ckpt")
    return path


def _metadata(path: Path) -> Any:
    return pickle.loads((path / ".metadata").read_bytes())  # the test's own file: plain pickle is fine here


def _replace_item(path: Path, fqn: str, obj: Any) -> Path:
    """Points the entry ``fqn`` of the DCP checkpoint at a ``torch.save`` of ``obj`` appended to its shard."""
    metadata = _metadata(path)
    info = next(s for i, s in metadata.storage_data.items() if i.fqn == fqn)
    shard = path / info.relative_path
    data = io.BytesIO()
    torch.save(obj, data)
    offset = shard.stat().st_size
    with open(shard, "ab") as stream:
        stream.write(data.getvalue())
    info.offset, info.length = offset, len(data.getvalue())
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    return shard


def plant(where: str, path: Path, marker: Path) -> Path:
    """Plants the payload in the file ``where`` of the checkpoint at ``path``; returns the file."""
    payload = Payload(marker)
    if where == ".metadata":  # a well-formed Metadata carrying the payload
        metadata = _metadata(path)
        metadata.storage_meta.modules = [payload]
        (path / ".metadata").write_bytes(pickle.dumps(metadata))
        return path / ".metadata"
    if where == "shard value":  # a non-tensor value: an optimizer option
        return _replace_item(path, "optimizer_0.param_groups.0.weight.lr", payload)
    if where == "shard tensor":
        return _replace_item(path, "state_dict.0.weight", {"weight": payload})
    if where == "meta.pt":
        torch.save({"epoch": 1, "hyper_parameters": payload}, path / "meta.pt")
        return path / "meta.pt"
    if where == "plain":
        plain = path.parent / "plain.ckpt"
        torch.save({"state_dict": _module().state_dict(), "hyper_parameters": {"config": payload}}, plain)
        return plain
    raise ValueError(where)


def test_the_payload_runs_under_plain_pickle(tmp_path: Path) -> None:
    """The control: the planted object does run when a file is read with plain pickle (or weights_only=False)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.is_dir()


def test_an_untouched_checkpoint_loads(checkpoint: Path) -> None:
    module, optimizer = _trained()
    fresh = _module()
    fresh_optimizer = _optimizer(fresh)
    rest = load_sharded(checkpoint, fresh, [fresh_optimizer])
    assert rest["epoch"] == 1 and rest["hyper_parameters"] == {"width": 4}
    for name, value in module.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert fresh_optimizer.param_groups[0]["lr"] == 0.1
    saved = optimizer.state_dict()["state"]
    for index, state in fresh_optimizer.state_dict()["state"].items():
        assert torch.equal(state["exp_avg"], saved[index]["exp_avg"]), index


def _resume(path: Path) -> Any:
    module = _module()
    return load_sharded(path, module, [_optimizer(module)])


def _resume_plain(path: Path) -> Any:
    module = _module()
    return load_plain(path.parent / "plain.ckpt", module, [_optimizer(module)], None)


def _convert(path: Path) -> Any:
    from lightning_bfpp.convert import to_lightning_checkpoint

    return to_lightning_checkpoint(path)


def _convert_command(path: Path) -> Any:
    from lightning_bfpp.convert import main

    return main([str(path), str(path.parent / "out.ckpt")])


def _huggingface_export(source: Path) -> Any:
    from lightning_bfpp.adapters.huggingface import export_pretrained

    return export_pretrained(source, source.parent / "exported")


def _litgpt_export(source: Path) -> Any:
    from lightning_bfpp.adapters.litgpt import save_litgpt_checkpoint

    return save_litgpt_checkpoint(source, source.parent / "exported")


def _litgpt_command(source: Path) -> Any:
    from lightning_bfpp.adapters.litgpt import main

    return main([str(source), str(source.parent / "exported")])


READERS: dict[str, tuple[Callable[[Path], Any], list[str]]] = {
    # reader: (what it runs on the checkpoint directory, the files it reads)
    "resume": (_resume, [".metadata", "shard value", "shard tensor", "meta.pt"]),
    "resume from a plain file": (_resume_plain, ["plain"]),
    "convert": (_convert, [".metadata", "shard tensor", "meta.pt"]),
    "convert command": (_convert_command, [".metadata", "shard tensor", "meta.pt"]),
    "huggingface export": (_huggingface_export, [".metadata", "shard tensor", "meta.pt"]),
    "huggingface export of a plain file": (lambda p: _huggingface_export(p.parent / "plain.ckpt"), ["plain"]),
    "litgpt export": (_litgpt_export, [".metadata", "shard tensor", "meta.pt"]),
    "litgpt command on a plain file": (lambda p: _litgpt_command(p.parent / "plain.ckpt"), ["plain"]),
}
CASES = [pytest.param(r, where, id=f"{r}-{where}") for r, (_, files) in READERS.items() for where in files]


@pytest.mark.parametrize(("reader", "where"), CASES)
def test_a_planted_payload_never_runs(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], reader: str, where: str
) -> None:
    marker = tmp_path / "ran"
    planted = plant(where, checkpoint, marker)
    read = READERS[reader][0]
    if "command" in reader:
        assert read(checkpoint) == 2  # the command ends with one line on stderr
        message = capsys.readouterr().err.strip()
    else:
        with pytest.raises(CheckpointError) as raised:
            read(checkpoint)
        message = str(raised.value)
    assert not marker.exists(), f"the payload in {where} ran"
    assert str(planted) in message and "\n" not in message, message
    assert "posix.mkdir" in message or "os.mkdir" in message, message


def test_a_litgpt_weights_file_with_a_payload_is_refused(tmp_path: Path) -> None:
    from litgpt import Config

    from lightning_bfpp.adapters.litgpt import LitGPTModule

    marker, weights = tmp_path / "ran", tmp_path / "lit_model.pth"
    torch.save({"transformer.wte.weight": Payload(marker)}, weights)
    config = Config.from_name("pythia-14m", n_layer=1, n_embd=32, n_head=4, vocab_size=64, padded_vocab_size=64)
    with pytest.raises(CheckpointError, match=str(weights)):
        LitGPTModule(config, checkpoint=weights)
    assert not marker.exists()


def test_metadata_naming_a_file_outside_the_checkpoint_is_refused(checkpoint: Path) -> None:
    metadata = _metadata(checkpoint)
    for info in metadata.storage_data.values():
        info.relative_path = "../plain.ckpt"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"\.metadata: it names the data file '\.\./plain\.ckpt' outside"):
        _resume(checkpoint)
