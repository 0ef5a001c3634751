"""One-file checkpoints (``save_distributed_checkpoint=False``), and ``load_from_checkpoint`` of a sharded directory.

One 2-rank job (float64) trains one epoch and saves a one-file checkpoint with P = 2 (tied weights, two parameter
groups, an LR scheduler), with ZeRO-1 and with ZeRO-3 (P = 1, D = 2); then resumes the P = 2 file for a second epoch
at another layout (P = 2, L = 2) and saves that as a sharded directory. Each file must equal the checkpoint one
process writes after the same epoch; the unsplit module and a one-process run load it; every resumed run ends with
the parameters and losses of one uninterrupted one-process run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TESTS_DIR, run_script
from eval_job import MetricModel, run

from lightning_bfpp import BFPPStrategy
from lightning_bfpp.lightning.consolidated import unsplit_order
from lightning_bfpp.run.split import RemoteLayer

TIED = {"num_blocks": 3, "optimizer": "adamw_groups", "lr": 0.05, "tied": True}
UNTIED = {**TIED, "tied": False}  # ZeRO-3 cannot shard a tie held twice by one rank (P = 1)
DATA = {"train_size": 16, "batch_size": 8}  # one epoch = 2 optimizer steps
ONE_FILE = {"save_distributed_checkpoint": False}


def _stage(name: str, model: dict[str, Any], strategy: Any, actions: list[list[Any]], epochs: int) -> dict[str, Any]:
    return {"name": name, "strategy": strategy, "model": model, "trainer": {"max_epochs": epochs}, "actions": actions}


def _close(seen: Any, expected: Any, what: str) -> None:
    """Equal structure; tensors equal to 1e-9, other values exactly."""
    if isinstance(expected, dict):
        assert list(seen) == list(expected), what  # the same keys, in the same order
        for key in expected:
            _close(seen[key], expected[key], f"{what}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(seen) == len(expected), what
        for i, (s, e) in enumerate(zip(seen, expected, strict=True)):
            _close(s, e, f"{what}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert seen.dtype == expected.dtype, what
        torch.testing.assert_close(seen, expected, rtol=1e-9, atol=1e-12, msg=lambda m: f"{what}: {m}")
    else:
        assert seen == expected, what


def _assert_like_one_process(path: Path, reference: Path) -> None:
    """The file at ``path`` is the checkpoint one process wrote at ``reference``: weights in the unsplit module's
    order, the optimizer state numbered as one process numbers it, and the same trainer state."""
    seen = torch.load(path, map_location="cpu", weights_only=True)
    expected = torch.load(reference, map_location="cpu", weights_only=True)
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "epoch", "global_step", "hyper_parameters"):
        _close(seen[key], expected[key], f"{path.name}:{key}")
    assert sorted(seen) == sorted(expected), path.name


@pytest.mark.timeout(400)
def test_one_file_checkpoints_equal_one_process_and_load_everywhere(tmp_path: Path) -> None:
    root = tmp_path / "root"
    base = {"devices": 1, "root_dir": str(root), "data": DATA, "out_dir": None}
    # one process: the references (a checkpoint after the first epoch; the uninterrupted run of two epochs)
    for name, model in (("tied", TIED), ("untied", UNTIED)):
        run({**base, "stages": [_stage(name, model, None, [["fit", None], ["save", f"{name}.one.ckpt"]], 1)]})
    ref = run({**base, "stages": [_stage("full", TIED, None, [["fit", None]], 2)]})["full"]

    p2 = {"pipeline_parallel_size": 2, "micro_batches": 2}
    zero1 = {"pipeline_parallel_size": 1, "sharding": "optimizer", **ONE_FILE}
    zero3 = {"pipeline_parallel_size": 1, "sharding": "full", **ONE_FILE}
    resume = [["fit", "p2.ckpt"], ["save", "sharded.ckpt"], ["save", "zero3.ckpt"]]  # two sharded directories
    stages = [
        _stage("p2", TIED, {**p2, **ONE_FILE}, [["fit", None], ["save", "p2.ckpt"]], 1),
        _stage("zero1", TIED, zero1, [["fit", None], ["save", "zero1.ckpt"]], 1),
        _stage("resume", TIED, {**p2, "stages_per_rank": 2}, resume, 2),  # another layout
        _stage("zero3", UNTIED, zero3, [["fit", None], ["save", "zero3.ckpt"]], 1),  # replaces a directory
    ]
    out = tmp_path / "out"
    out.mkdir()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**base, "devices": 2, "out_dir": str(out), "stages": stages, "pg_timeout": 60}))
    code, output = run_script(TESTS_DIR / "eval_job.py", [str(config)], timeout=360)
    if code != 0:
        pytest.fail(f"job failed with exit code {code}:\n{output[-6000:]}")

    # each file is what one process writes after the same epoch
    _assert_like_one_process(root / "p2.ckpt", root / "tied.one.ckpt")
    _assert_like_one_process(root / "zero1.ckpt", root / "tied.one.ckpt")
    assert (root / "zero3.ckpt").is_file()
    _assert_like_one_process(root / "zero3.ckpt", root / "untied.one.ckpt")

    # the resumed bfpp run at another layout continues the uninterrupted run
    expected_losses = [step["train_loss"] for step in ref["train"][2:]]
    resumed_state = []
    for r in range(2):
        resumed = torch.load(out / f"resume.rank{r}.pt", weights_only=False)
        resumed_state.append(resumed["state"])
        assert (resumed["epoch"], resumed["global_step"]) == (2, 4)
        assert [step["train_loss"] for step in resumed["train"]] == pytest.approx(expected_losses, rel=1e-9)
        for name, value in resumed["state"].items():
            torch.testing.assert_close(value, ref["state"][name], rtol=1e-9, atol=1e-12)

    # one process resumes the file (Trainer(strategy="auto").fit(ckpt_path=...)) as it resumes its own checkpoint.
    # (Lightning restores a one-process checkpoint before "64-true" converts the float32-built module: both resumed
    # runs are ~1e-8 off the uninterrupted one.)
    auto = run({**base, "stages": [_stage("auto", TIED, None, [["fit", "p2.ckpt"]], 2)]})["auto"]
    own = run({**base, "stages": [_stage("own", TIED, None, [["fit", "tied.one.ckpt"]], 2)]})["own"]
    assert (auto["epoch"], auto["global_step"]) == (2, 4)
    assert [step["train_loss"] for step in auto["train"]] == pytest.approx(expected_losses, rel=1e-6)
    assert [step["train_loss"] for step in auto["train"]] == pytest.approx(
        [step["train_loss"] for step in own["train"]], rel=1e-9
    )
    _close(auto["state"], own["state"], "strategy='auto' resumed")

    # Model.load_from_checkpoint reads the file, and the sharded directory too (the default format); the module is
    # built in float32, so it holds the saved float64 values rounded
    loaded = MetricModel.load_from_checkpoint(root / "p2.ckpt", map_location="cpu")
    saved = torch.load(root / "p2.ckpt", weights_only=True)["state_dict"]
    _close(loaded.state_dict(), {name: value.float() for name, value in saved.items()}, "loaded file")
    from_directory = MetricModel.load_from_checkpoint(root / "sharded.ckpt", map_location="cpu")
    assert from_directory.hparams.tied and (root / "sharded.ckpt" / "meta.pt").is_file()
    final = {name: value for r in range(2) for name, value in resumed_state[r].items()}
    _close(from_directory.state_dict(), {name: final[name].float() for name in from_directory.state_dict()}, "dir")


def test_one_file_save_refuses_a_directory_and_replaces_a_sharded_checkpoint(tmp_path: Path) -> None:
    """Without a process group (one rank): what is at the path decides, as for ModelParallelStrategy."""
    strategy = BFPPStrategy(save_distributed_checkpoint=False)
    assert strategy.save_distributed_checkpoint is False
    checkpoint = {"state_dict": {"w": torch.ones(2)}, "epoch": 3}
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="a directory that is not a checkpoint is there"):
        strategy.save_checkpoint(checkpoint, tmp_path / "folder")
    sharded = tmp_path / "last.ckpt"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"")  # an incomplete sharded checkpoint: replaced as well
    strategy.save_checkpoint(checkpoint, sharded)
    assert sharded.is_file() and torch.load(sharded, weights_only=True)["epoch"] == 3


def test_load_from_checkpoint_explains_a_directory_that_is_no_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"python -m lightning_bfpp\.convert .* model\.ckpt"):
        MetricModel.load_from_checkpoint(tmp_path)
    with pytest.raises(TypeError, match="cannot be called on an instance"):
        MetricModel().load_from_checkpoint(tmp_path)


def test_unsplit_order_puts_other_ranks_layers_where_they_were() -> None:
    model = MetricModel(**TIED)
    expected = list(model.state_dict())
    model.blocks[1] = RemoteLayer(2, 1)  # layer 2 lives on pipeline rank 1
    model.head = RemoteLayer(4, 1)
    local = list(model.state_dict())
    remote = [k for k in expected if k.startswith(("blocks.1.", "head."))]
    assert unsplit_order(model, remote + local) == expected
