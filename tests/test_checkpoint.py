"""Sharded checkpoints: exact resume, resume on another layout, conversion to one state dict, plain checkpoints.

One multi-process job per layout trains one epoch (2 optimizer steps, Adam and an LR scheduler, float64), saves a
sharded checkpoint and converts it in-process on rank 0, then resumes it for a second epoch with the same layout and
with other values of P, L and D, and starts a run from a plain one-file checkpoint written by one process. Every
resumed run must end with the parameters and losses of one uninterrupted one-process run of two epochs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TESTS_DIR, run_python, run_script
from eval_job import MetricModel, run
from torch.distributed.checkpoint import FileSystemReader

from lightning_bfpp.convert import to_state_dict
from lightning_bfpp.run.checkpoint import load_plain, model_state_dict, save_sharded

MODEL = {"num_blocks": 6, "optimizer": "adam", "lr": 0.05}
DATA = {"train_size": 16, "batch_size": 8}  # one epoch = 2 optimizer steps


def _stage(
    name: str, strategy: dict[str, Any] | None, actions: list[list[Any]], epochs: int, **model: Any
) -> dict[str, Any]:
    trainer = {"max_epochs": epochs}
    return {"name": name, "strategy": strategy, "model": {**MODEL, **model}, "trainer": trainer, "actions": actions}


def _merged(results: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for result in results:
        for name, value in result["state"].items():
            if name in merged:  # replicas hold identical copies
                assert torch.equal(merged[name], value), name
            merged[name] = value
    return merged


def _assert_state_equal(seen: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(seen) == sorted(expected), what
    for name, value in expected.items():
        torch.testing.assert_close(seen[name], value, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{what} {n}: {m}")


def _strategy(P: int, L: int, M: int, **extra: Any) -> dict[str, Any]:
    return {"pipeline_parallel_size": P, "stages_per_rank": L, "micro_batches": M, **extra}


LAYOUTS = [
    pytest.param(
        2,
        _strategy(2, 1, 2),
        {"looped": _strategy(2, 2, 4), "one-stage-two-replicas": _strategy(1, 1, 2)},
        True,
        id="P2-to-P2L2-and-P1D2-and-failures",
    ),
    pytest.param(
        4,
        _strategy(2, 1, 2),
        {"looped": _strategy(2, 2, 2, rank_layout="pp_contiguous"), "four-stages": _strategy(4, 1, 4)},
        False,
        id="P2xD2-to-P2L2D2-and-P4",
    ),
]


@pytest.mark.parametrize(("devices", "saved_on", "others", "failures"), LAYOUTS)
def test_resume_exact_on_any_layout_and_convert(tmp_path, devices, saved_on, others, failures) -> None:
    """With ``failures``, the same job also checks, on every rank, errors that ``test_checkpoint_errors.py`` checks in
    one process: strict loading of the 6-block checkpoint into a 4-block module, a truncated shard, a save onto a full
    disk (a tmpfs: needs root) that leaves no partial directory and the previous checkpoint loadable."""
    root = tmp_path / "root"
    base = {"devices": 1, "root_dir": str(root), "data": DATA, "out_dir": None}
    # one process: the uninterrupted run, and a plain one-file checkpoint after the first epoch
    ref = run({**base, "stages": [_stage("full", None, [["fit", None]], 2)]})["full"]
    ref_first = run({**base, "stages": [_stage("first", None, [["fit", None], ["save", "plain.ckpt"]], 1)]})["first"]
    assert (root / "plain.ckpt").is_file()

    stages = [
        _stage("first", saved_on, [["fit", None], ["save", "sharded.ckpt"], ["convert", "sharded.ckpt"]], 1),
        _stage("same", saved_on, [["fit", "sharded.ckpt"]], 2),
        *(_stage(name, strategy, [["fit", "sharded.ckpt"]], 2) for name, strategy in others.items()),
        _stage("from-plain", saved_on, [["fit", "plain.ckpt"]], 2),
    ]
    disk = root / "disk"
    if failures:
        stages += _failure_stages(root, saved_on, mounted=_mount_small_disk(disk))
    out = tmp_path / "out"
    out.mkdir()
    cfg = {**base, "devices": devices, "out_dir": str(out), "stages": stages, "pg_timeout": 60}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    try:
        code, output = run_script(TESTS_DIR / "eval_job.py", [str(tmp_path / "config.json")], timeout=300)
        disk_files = sorted(p.name for p in disk.iterdir()) if disk.is_mount() else None
        previous = to_state_dict(disk / "a.ckpt") if (disk / "a.ckpt").is_dir() else None  # loadable after?
    finally:
        if disk.is_mount():
            subprocess.run(["umount", str(disk)], check=True)
    if code != 0:
        pytest.fail(f"job failed with exit code {code}:\n{output[-6000:]}")
    ranks = {
        s["name"]: [torch.load(out / f"{s['name']}.rank{r}.pt", weights_only=False) for r in range(devices)]
        for s in stages
    }

    first = _merged(ranks["first"])
    _assert_state_equal(first, ref_first["state"], "first epoch")
    for name in ["same", *others, "from-plain"]:
        results = ranks[name]
        # the resumed run continues the same run: same losses on the resumed steps, same parameters at the end
        _assert_state_equal(_merged(results), ref["state"], name)
        for result in results:
            assert (result["epoch"], result["global_step"]) == (2, 4), name
            logged = [step["train_loss"] for step in result["train"]]
            assert logged == pytest.approx([step["train_loss"] for step in ref["train"][2:]], rel=1e-9), name

    # each rank wrote its own stages; the files do not depend on the layout: one state dict of the unsplit module
    sharded = root / "sharded.ckpt"
    assert (sharded / "meta.pt").is_file() and (sharded / ".metadata").is_file()
    for index, info in FileSystemReader(sharded).read_metadata().storage_data.items():
        if index.fqn.startswith("state_dict."):  # written by a rank that holds it, once
            writer = int(info.relative_path.split("_")[2])
            assert index.fqn[len("state_dict.") :] in ranks["first"][writer]["state"], (index.fqn, writer)
    converted = ranks["first"][0]["converted"]
    assert sorted(converted) == sorted(first)
    for name, value in first.items():
        assert torch.equal(converted[name], value), name
    MetricModel(**MODEL).load_state_dict(converted, strict=True)

    # the command writes a plain Lightning checkpoint that the unsplit module loads (strict)
    plain = tmp_path / "converted.ckpt"
    code, output = run_python(["-m", "lightning_bfpp.convert", str(sharded), str(plain)], timeout=120)
    assert code == 0, output[-3000:]
    loaded = MetricModel.load_from_checkpoint(plain, map_location="cpu", weights_only=False)  # a float32 module
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, first[name].float(), rtol=0, atol=0)
    checkpoint = torch.load(plain, weights_only=False)
    module = MetricModel(**MODEL).double()
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    for name, value in module.state_dict().items():
        assert torch.equal(value, first[name]), name
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (1, 2)  # saved after the first epoch
    assert checkpoint["hyper_parameters"]["optimizer"] == "adam" and "optimizer_states" not in checkpoint

    if failures:
        _assert_failures(ranks, first, disk_files, previous)


def _mount_small_disk(disk: Path) -> bool:
    """A 1 MiB tmpfs at ``disk`` (root only); whether it is mounted."""
    disk.mkdir(parents=True)
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode
        == 0
    )


def _failure_stages(root: Path, strategy: dict[str, Any], mounted: bool) -> list[dict[str, Any]]:
    """Stages whose load or save fails on every rank: the 6-block checkpoint into a 4-block module; a checkpoint with
    a truncated shard (written here, in one process); with ``mounted``, a save onto a full disk, after a first save
    of the same path (which the test loads after the job)."""
    damaged = root / "truncated-shard.ckpt"
    save_sharded({"state_dict": model_state_dict(MetricModel(**MODEL).double()), "epoch": 1}, damaged, True)
    shard = damaged / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    stages = [
        _stage("shallower", strategy, [["fit_error", "sharded.ckpt"]], 2, num_blocks=4),  # no rank holds blocks 4-5
        _stage("truncated-shard", strategy, [["fit_error", "truncated-shard.ckpt"]], 2),
    ]
    if mounted:
        saves = [
            ["fit", "sharded.ckpt"],  # restores the first epoch, trains nothing (max_epochs=1)
            ["save", "disk/a.ckpt"],
            ["fill_disk", "disk/filler"],
            ["save_error", "disk/a.ckpt"],
        ]
        stages.append(_stage("full-disk", strategy, saves, 1))
    return stages


FAILURES = {  # stage: what its error must say, on every rank
    "shallower": ["the module has no ['blocks.4.linear.bias', 'blocks.4.linear.weight', 'blocks.5.linear.bias', "],
    "truncated-shard": ["truncated-shard.ckpt/__0_0.distcp is truncated: it has "],
}


def _assert_failures(
    ranks: dict[str, list[dict[str, Any]]], first: dict[str, torch.Tensor], disk_files: Any, previous: Any
) -> None:
    for name, expected in FAILURES.items():
        for result in ranks[name]:
            error = result["actions"][0]["error"]
            assert error is not None and "\n" not in error, (name, error)
            assert all(text in error for text in expected), (name, error)
    if disk_files is None:
        pytest.skip("the full-disk part needs root (mount -t tmpfs)")
    for result in ranks["full-disk"]:
        error = result["actions"][-1]["error"]
        assert error is not None and "\n" not in error, error
        assert "Cannot save the checkpoint" in error and "disk/a.ckpt" in error, error
        assert "No space left on device" in error, error
    assert disk_files == ["a.ckpt", "filler"] and previous is not None  # no partial directory left behind
    _assert_state_equal(previous, first, "the checkpoint that the failed save would have replaced")


def test_plain_checkpoint_errors_name_the_keys(tmp_path: Path) -> None:
    model = MetricModel(**MODEL)
    state = model.state_dict()
    state.pop("blocks.2.linear.weight")
    state["blocks.9.linear.weight"] = torch.zeros(1)
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(RuntimeError, match=r"lacks \['blocks.2.linear.weight'\].*has no \['blocks.9.linear.weight'\]"):
        load_plain(path, model, [], None, strict=True, weights_only=False)
    checkpoint = load_plain(path, model, [], None, strict=False, weights_only=False)
    assert checkpoint == {}


def test_convert_command_rejects_a_file(tmp_path: Path) -> None:
    from lightning_bfpp.convert import main

    path = tmp_path / "x.ckpt"
    path.write_bytes(b"")
    assert main([str(path), str(tmp_path / "y.ckpt")]) == 2
