"""The Hydra app support of the package (:mod:`lightning_bfpp.hydra`): ``ckpt_path=last``, the checks before launch,
``--help``; in-process apart from two short runs of the main job that start no process group."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from lightning_bfpp.hydra import ConfigError, newest_checkpoint, resolve_ckpt_path, resolve_trainer
from lightning_bfpp.run import checkpoint as bfpp_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from bfpp_examples.config import register_configs  # noqa: E402
from conftest import run_script  # noqa: E402

register_configs()


def compose_cfg(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("train", overrides=list(overrides))


# ------------------------------------------------------------------------------------------------ ckpt_path=last
def save_sharded(module: nn.Module, path: Path, step: int) -> Path:
    """A complete sharded checkpoint of ``module`` at ``path``, written by one process as every rank would."""
    state = {"state_dict": bfpp_checkpoint.model_state_dict(module), "global_step": step}
    bfpp_checkpoint.save_sharded(state, path, is_global_zero=True)
    return path


def save_file(path: Path, step: int) -> Path:
    torch.save({"global_step": step}, path)
    return path


def test_last_is_the_newest_complete_checkpoint_whatever_its_name(tmp_path: Path) -> None:
    """Without ``save_last`` there is no ``last.ckpt``: ``last`` is still the newest complete checkpoint, of any
    earlier run; a save that did not finish (no ``meta.pt``; a truncated file) is passed over."""
    runs = tmp_path / "outputs"
    first, second = runs / "a" / "checkpoints", runs / "b" / "checkpoints"
    first.mkdir(parents=True), second.mkdir(parents=True)
    save_sharded(nn.Linear(2, 2), first / "step000005.ckpt", 5)
    time.sleep(0.02)
    newest = save_file(second / "step000007.ckpt", 7)
    time.sleep(0.02)
    (first / "step000009.ckpt").mkdir()  # a sharded save killed before its meta.pt: incomplete
    truncated = save_file(second / "step000011.ckpt", 11)
    truncated.write_bytes(truncated.read_bytes()[:-30])  # a one-file save killed while writing
    found = resolve_ckpt_path("last", runs / "c", runs / "c" / "checkpoints")
    assert found == str(newest)
    # in a sweep, only the job's own checkpoints count
    assert resolve_ckpt_path("last", runs / "a", first, sweep=True) == str(first / "step000005.ckpt")
    assert resolve_ckpt_path("last", tmp_path / "x" / "y", tmp_path / "x" / "y" / "checkpoints") is None


def test_a_save_killed_between_its_two_renames_leaves_a_loadable_last(tmp_path: Path, monkeypatch) -> None:
    """A sharded save replaces ``last.ckpt`` by two renames (the old one aside, the new one in place): a process
    killed between them leaves no ``last.ckpt``, and ``ckpt_path=last`` still finds a complete checkpoint that
    loads."""
    torch.manual_seed(0)
    checkpoints = tmp_path / "run" / "checkpoints"
    last = checkpoints / "last.ckpt"
    old_model, new_model = nn.Linear(3, 2), nn.Linear(3, 2)
    save_sharded(old_model, last, 4)
    time.sleep(0.02)
    save_sharded(new_model, bfpp_checkpoint.partial_path(last), 8)

    renames = []
    real_rename = Path.rename

    def rename_then_die(self: Path, target: Path) -> Path:
        if renames:
            raise KeyboardInterrupt("killed between the renames")  # what the disk holds after a SIGKILL here
        renames.append(target)
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        bfpp_checkpoint.replace_path(bfpp_checkpoint.partial_path(last), last)
    monkeypatch.undo()
    assert renames and not last.exists()

    found = resolve_ckpt_path("last", tmp_path / "next", tmp_path / "next" / "checkpoints")
    assert found is not None
    loaded = nn.Linear(3, 2)
    meta = bfpp_checkpoint.load_sharded(Path(found), loaded, [])
    assert meta["global_step"] == 8  # the newest complete one: the new checkpoint, not yet renamed into place
    assert torch.equal(loaded.weight, new_model.weight)
    # and with only the old one left aside, that one
    bfpp_checkpoint.remove_path(Path(found))
    assert newest_checkpoint([checkpoints]) == checkpoints / f".last.ckpt{bfpp_checkpoint.OLD_SUFFIX}"
    assert bfpp_checkpoint.load_sharded(newest_checkpoint([checkpoints]), loaded, [])["global_step"] == 4
    assert torch.equal(loaded.weight, old_model.weight)


# --------------------------------------------------------------------------------------------- checks before launch
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("overrides", [("trainer=gpu",), ("trainer.accelerator=cuda", "trainer.devices=2")])
def test_a_gpu_trainer_without_a_gpu_is_refused_in_one_line(overrides: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as error:
        resolve_trainer(compose_cfg(*overrides))
    assert "no CUDA GPU is visible" in str(error.value) and "trainer=cpu" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.devices=0", "trainer.devices=0"),
        ("trainer.devices=[]", "trainer.devices=[]"),
        ("trainer.num_nodes=0", "trainer.num_nodes=0"),
    ],
)
def test_no_devices_is_refused_in_one_line(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as error:
        resolve_trainer(compose_cfg("trainer=cpu", override))
    assert named in str(error.value) and "\n" not in str(error.value)


def test_the_main_job_refuses_bad_sizes_and_shows_its_options(tmp_path: Path) -> None:
    """``data.seq_len=0`` ends the main job in one line before any process starts; ``--help`` lists the groups a
    user chooses from and what every strategy option means, not the internal ``schema/*`` groups."""
    code, output = run_script(
        ROOT / "examples" / "train.py", ["data.seq_len=0", f"hydra.run.dir={tmp_path}"], timeout=90, cwd=ROOT
    )
    assert code != 0
    assert "data.seq_len=0: give a number >= 1." in output.splitlines(), output[-3000:]
    assert "Traceback" not in output and "Initializing distributed" not in output

    code, output = run_script(ROOT / "examples" / "train.py", ["--help"], timeout=90, cwd=ROOT)
    assert code == 0, output[-3000:]
    assert "schedule: 1f1b, breadth_first, breadth_first_grouped, depth_first, gpipe" in output
    assert "strategy: bfpp, ddp, single" in output and "schema/" not in output
    assert "strategy.micro_batches (default None)" in output
    assert "M, the number of micro-batches each batch is split into" in output


def test_importing_the_package_imports_neither_hydra_nor_lightning() -> None:
    code = (
        "import sys, lightning_bfpp, lightning_bfpp.config, lightning_bfpp.options; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'omegaconf', 'lightning'}))"
    )
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
