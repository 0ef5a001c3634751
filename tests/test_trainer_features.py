"""Lightning's stock callbacks and the Trainer features users reach for: each works as on one process (compared in
float64 where it changes training) or is refused on every rank before the process group exists; and the calls that
cannot work under a pipeline (a collective in a last-stage hook, ``self(batch)`` outside the pipeline hooks) end
every rank with an error that says what to do instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TESTS_DIR
from launch import launch_ranks
from lightning.pytorch import Callback, callbacks
from run_job import run, stock_callbacks

from lightning_bfpp.lightning.trainer_checks import CALLBACK_SUPPORT, refusal

REFUSED = sorted(name for name, support in CALLBACK_SUPPORT.items() if support.refused is not None)
WORKING = [  # run together in one fit (the progress bars and summaries in two)
    "DeviceStatsMonitor",
    "EarlyStopping",
    "GradientAccumulationScheduler",
    "LambdaCallback",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "ModelSummary",
    "TQDMProgressBar",
    "ThroughputMonitor",
    "Timer",
]
P2 = {"devices": 2, "strategy": {"pipeline_parallel_size": 2, "stages_per_rank": 2, "micro_batches": 2}}
BASE = {**P2, "model": {"num_blocks": 4, "step_scheduler": True}, "batch_size": 4, "data_size": 32, "pg_timeout": 60}


def test_every_stock_callback_is_classified() -> None:
    """A callback that a new Lightning release exports fails here until it is tried and classified."""
    assert set(callbacks.__all__) == set(CALLBACK_SUPPORT)


def test_refusals_name_the_callback_and_what_to_use() -> None:
    for name in REFUSED:
        (callback,) = stock_callbacks([name], None) if name != "BaseFinetuning" else ([callbacks.BaseFinetuning()])
        message = refusal(callback)
        assert message is not None and f"The callback {name} is not supported by BFPPStrategy" in message
    (user_ema,) = stock_callbacks(["UserEMA"], None)  # a user's subclass of a refused callback
    assert "The callback UserEMA (a EMAWeightAveraging) is not supported" in (refusal(user_ema) or "")
    assert refusal(Callback()) is None
    assert refusal(type("UserCallback", (Callback,), {})()) is None
    for callback in stock_callbacks([*WORKING, "RichModelSummary", "RichProgressBar", "SpikeDetection"], None):
        assert refusal(callback) is None, type(callback).__name__


# every run: one launch of two ranks (P = 2, L = 2), a fresh module and Trainer per run
COMPARED = [
    {  # the working callbacks at once; GradientAccumulationScheduler doubles the accumulation from epoch 1 on
        "name": "callbacks",
        "callbacks": WORKING,
        "csv_logger": True,
        "max_steps": -1,
        "trainer": {
            "max_epochs": 3,
            "limit_train_batches": 6,
            "limit_val_batches": 2,
            "val_check_interval": 0.5,
            "enable_progress_bar": True,
            "enable_model_summary": True,
        },
    },
    {
        "name": "rich",
        "callbacks": ["RichModelSummary", "RichProgressBar"],
        "max_steps": 2,
        "trainer": {"enable_progress_bar": True, "enable_model_summary": True},
    },
    {"name": "fast_dev_run", "trainer": {"fast_dev_run": 2}},
    {"name": "init_module", "build_on": "init_module", "empty_init": False, "max_steps": 2},
    {  # accumulation with a per-step scheduler, validation every other epoch, anomaly detection
        "name": "features",
        "accumulate": 2,
        "max_steps": -1,
        "trainer": {"max_epochs": 4, "overfit_batches": 4, "check_val_every_n_epoch": 2, "detect_anomaly": True},
    },
    {"name": "limits", "max_steps": -1, "trainer": {"max_epochs": 2, "limit_train_batches": 3}},
    {"name": "spike", "callbacks": ["SpikeDetection"], "max_steps": 6, "expect_error": True},
]
REFUSED_RUNS = [
    {"name": name, "callbacks": [name], "expect_error": True} for name in REFUSED if name != "BaseFinetuning"
]
REFUSED_RUNS += [
    {"name": "UserEMA", "callbacks": ["UserEMA"], "expect_error": True},
    {"name": "lr_find", "tune": "lr_find", "expect_error": True},
    {"name": "scale_batch_size", "tune": "scale_batch_size", "expect_error": True},
]


LIGHTNING_REFUSES_BATCH_SIZE_TUNING = "Tuning the batch size is currently not supported with distributed strategies."


def errors(out_dir: Path) -> list[str]:
    return [path.read_text() for path in sorted(out_dir.glob("rank*.error"))]


def test_callbacks_and_trainer_features(run_job, tmp_path: Path) -> None:
    """Each run trains like one process (every parameter, every logged loss, the step and epoch it stopped at, the
    validation metrics); SpikeDetection stops both at the same batch; each refused callback and Tuner method stops
    every rank at start, naming it and what to use instead."""
    result = run_job({**BASE, "runs": COMPARED + REFUSED_RUNS}, timeout=400)
    for overrides in COMPARED:
        name = overrides["name"]
        ref_dir = tmp_path / "reference" / name
        ref_dir.mkdir(parents=True)
        config = {
            k: v for k, v in {**BASE, **overrides}.items() if k not in ("strategy", "devices", "expect_error", "name")
        }
        if overrides.get("expect_error"):
            with pytest.raises(Exception) as raised:
                run({**config, "out_dir": str(ref_dir)})
            assert errors(result.out_dir / name) == [f"{type(raised.value).__name__}: {raised.value}"] * 2
            continue
        ref = run({**config, "out_dir": str(ref_dir)})
        assert_same_training(result.out_dir / name, ref, name)
        if name == "callbacks":  # 6 steps, then 3 steps of 2 batches (epoch 1), then EarlyStopping ended it
            assert (ref["global_step"], len(ref["losses"])) == (9, 12)
    for overrides in REFUSED_RUNS:
        name = overrides["name"]
        messages = errors(result.out_dir / name)
        assert len(messages) == 2, name  # raised on every rank
        assert not list((result.out_dir / name).glob("rank*.pt"))
        if name == "scale_batch_size":  # Lightning's Tuner refuses it itself for every distributed strategy
            assert set(messages) == {f"ValueError: {LIGHTNING_REFUSES_BATCH_SIZE_TUNING}"}
            continue
        label = {"lr_find": "LearningRateFinder"}.get(name, name)
        reason = CALLBACK_SUPPORT["EMAWeightAveraging" if name == "UserEMA" else label].refused
        for message in messages:
            assert message.startswith(f"ValueError: The callback {label}"), message
            assert f"is not supported by BFPPStrategy: it {reason}." in message, message


def assert_same_training(out_dir: Path, ref: dict[str, Any], name: str) -> None:
    ranks = [torch.load(path, weights_only=False) for path in sorted(out_dir.glob("rank*.pt"))]
    assert len(ranks) == 2, name
    state = {k: v for rank in ranks for k, v in rank["state"].items()}
    assert state.keys() == ref["state"].keys(), name
    for key, value in ref["state"].items():
        torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-12, msg=lambda m, k=key: f"{name} {k}: {m}")
    for rank in ranks:
        assert (rank["global_step"], rank["epoch"]) == (ref["global_step"], ref["epoch"]), name
        torch.testing.assert_close(torch.tensor(rank["logged"]), torch.tensor(ref["logged"]), rtol=1e-9, atol=0)
        assert rank["callback_metrics"].keys() == ref["callback_metrics"].keys(), name
        for key, value in ref["callback_metrics"].items():
            assert rank["callback_metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)


TRAPS = [  # (trap, where it is called, what the error says)
    ("all_gather", "self.all_gather() / trainer.strategy.all_gather() was called inside a hook"),
    ("barrier", "trainer.strategy.barrier() was called inside a hook"),
    ("sync_dist_group", "self.log('grouped', ..., sync_dist_group=...) inside a pipeline hook"),
    ("reduce", "trainer.strategy.reduce() was called inside a hook"),
    ("forward", "TrapModel.forward (`self(batch)`) was called outside the pipeline hooks"),
]


def test_traps_end_every_rank_with_what_to_do(tmp_path: Path) -> None:
    """A collective inside a last-stage hook (pipeline_loss, validation_step) and ``self(batch)`` in a hook every rank
    runs: every rank raises the error, instead of the other ranks waiting for the collective until the timeout. One
    launch: each trap a fresh fit; the last one is not caught, so every rank exits non-zero."""
    runs = [
        {
            "name": trap,
            "model_class": "TrapModel",
            "model": {"num_blocks": 2, "trap": trap},
            "trainer": {"limit_val_batches": 1, "num_sanity_val_steps": 1},
            "expect_error": trap != TRAPS[-1][0],
        }
        for trap, _ in TRAPS
    ]
    config = {**BASE, "out_dir": str(tmp_path / "out"), "runs": runs}
    exits = launch_ranks(TESTS_DIR / "run_job.py", config, 2, tmp_path, timeout=180)
    for rank, ended in enumerate(exits):
        assert ended.returncode not in (0, None), f"rank {rank}: {ended.returncode}\n{ended.output[-3000:]}"
        assert TRAPS[-1][1] in ended.output, ended.output[-3000:]
    for trap, message in TRAPS[:-1]:
        seen = errors(tmp_path / "out" / trap)
        assert len(seen) == 2, (trap, seen)  # on every rank, within the launch (a hang would end in a timeout instead)
        for text in seen:
            assert text.startswith("PipelineHookError: ") and message in text, text
            assert "sync_dist" in text, text  # says what to use instead
