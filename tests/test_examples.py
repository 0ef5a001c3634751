"""The example Hydra apps run as a user runs them: bounded subprocesses, 2 CPU processes, tiny models and few steps."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from conftest import run_script
from lightning.pytorch.utilities.model_summary import get_human_readable_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from bfpp_examples.gpt import GPT  # noqa: E402

TRAIN = ROOT / "examples" / "train.py"
TRAIN_CONVNET = ROOT / "examples" / "train_convnet.py"

COMMON = [
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_model_summary=false",
    "checkpoint.every_n_train_steps=3",
    "log_interval=2",
    "strategy.timeout=60",  # a broken run fails fast instead of waiting on a collective
]
TINY_DATA = ["data.seq_len=32", "data.batch_size=8", "data.max_tokens=200000"]
TINY_GPT = [*COMMON, "model.n_layer=2", "model.n_embd=32", "model.n_head=2", *TINY_DATA]


def train(script: Path, *args: str, timeout: float = 90) -> tuple[int, str]:
    return run_script(script, list(args), timeout, cwd=ROOT)


def logged_steps(output: str) -> list[int]:
    return [int(s) for s in re.findall(r"step (\d+)/\d+ \| loss", output)]


def test_main_job_trains_checkpoints_reports_throughput_and_resumes(tmp_path: Path) -> None:
    with_summary = [arg for arg in TINY_GPT if not arg.startswith("trainer.enable_model_summary")]
    code, output = train(TRAIN, *with_summary, "trainer.max_steps=6", f"hydra.run.dir={tmp_path / 'first'}")
    assert code == 0, output[-4000:]
    # the default model summary counts the whole model, not rank 0's stages
    one_process = sum(p.numel() for p in GPT(vocab_size=256, seq_len=32, n_layer=2, n_head=2, n_embd=32).parameters())
    assert f"Total params: {get_human_readable_count(one_process)}" in output, output[-4000:]
    assert "RemoteLayer" not in output
    assert "cpu x 2" in output and "pipeline_parallel_size=2, stages_per_rank=2, micro_batches=4" in output
    assert logged_steps(output) == [2, 4, 6]
    assert re.search(r"mean throughput [\d,]+ tokens/s", output), output[-2000:]
    assert "validation at step 6 | val_loss" in output
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert last.exists() and f"checkpoint: {last}" in output
    assert (tmp_path / "first" / "train_ddp_process_1.log").exists()  # rank 1 ran in the same run directory

    # a second run resumes from the newest last.ckpt next to it and continues at step 7
    code, output = train(
        TRAIN, *TINY_GPT, "trainer.max_steps=8", "ckpt_path=last", f"hydra.run.dir={tmp_path / 'second'}"
    )
    assert code == 0, output[-4000:]
    assert f"resuming from {last}" in output
    assert logged_steps(output) == [8]
    assert (tmp_path / "second" / "checkpoints" / "last.ckpt").exists()


def test_main_job_trains_litgpt_and_exports_it(tmp_path: Path) -> None:
    """``model=litgpt model.name=pythia-14m`` (shrunk, byte-level vocabulary) trains through the pipeline, and its
    checkpoint exports to a LitGPT checkpoint directory that ``litgpt.GPT`` loads strictly."""
    import torch
    from litgpt import GPT, Config

    from lightning_bfpp.adapters.litgpt import main as export

    shape = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2"]
    args = [*COMMON, *TINY_DATA, "model=litgpt", "model.name=pythia-14m", *shape, "trainer.max_steps=2"]
    code, output = train(TRAIN, *args, f"hydra.run.dir={tmp_path}")
    assert code == 0, output[-4000:]
    assert "LitGPT with" in output and "cpu x 2" in output
    assert logged_steps(output) == [2]
    assert export([str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "exported")]) == 0

    config = Config.from_file(tmp_path / "exported" / "model_config.yaml")
    assert (config.name, config.n_layer, config.n_embd, config.padded_vocab_size) == ("pythia-14m", 2, 32, 256)
    GPT(config).load_state_dict(torch.load(tmp_path / "exported" / "lit_model.pth", weights_only=True), strict=True)


def test_bad_key_or_value_fails_at_start_naming_it(tmp_path: Path) -> None:
    code, output = train(TRAIN, "strategy.micro_batchs=8", f"hydra.run.dir={tmp_path}", timeout=60)
    assert code != 0 and "strategy.micro_batchs" in output
    code, output = train(TRAIN, "strategy.schedule=looped", f"hydra.run.dir={tmp_path}", timeout=60)
    assert code != 0 and "Invalid value 'looped', expected one of [breadth_first, depth_first" in output
    assert "Initializing distributed" not in output  # failed before any process started


def test_multirun_over_two_values(tmp_path: Path) -> None:
    code, output = train(
        TRAIN,
        "-m",
        *TINY_GPT,
        "trainer.max_steps=3",
        "schedule=breadth_first,depth_first",
        f"hydra.sweep.dir={tmp_path}",
        timeout=150,
    )
    assert code == 0, output[-4000:]
    assert "schedule=breadth_first" in output and "schedule=depth_first" in output
    for job in ("0", "1"):
        assert (tmp_path / job / "checkpoints" / "last.ckpt").exists()
        assert (tmp_path / job / "train_ddp_process_1.log").exists()  # each job ran its own 2 processes
    assert not (tmp_path / "2").exists()  # the child processes did not start the sweep again


def test_convnet_example_trains(tmp_path: Path) -> None:
    code, output = train(
        TRAIN_CONVNET,
        *COMMON,
        "trainer.max_steps=4",
        "model.channels=8",
        "model.num_blocks=4",
        "model.downsample_at=[1]",
        "data.image_size=12",
        "data.train_size=256",
        "data.val_size=64",
        "data.batch_size=8",
        f"hydra.run.dir={tmp_path}",
    )
    assert code == 0, output[-4000:]
    assert "ConvNet" in output and "cpu x 2" in output
    assert logged_steps(output) == [2, 4]
    assert re.search(r"train_acc [\d.]+ \| [\d,]+ samples/s", output), output[-2000:]
    assert "val_acc" in output
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
