"""validate / test / predict, logging, torchmetrics, callbacks and loggers through the pipeline, against one process.

One multi-process job per layout runs a fit of 3 epochs with ModelCheckpoint(monitor="val_loss", save_top_k=2,
save_last=True), EarlyStopping, LearningRateMonitor, CSVLogger, TensorBoardLogger and a progress bar, sanity
validation steps, then validate(ckpt_path="best"), test and predict (with a BasePredictionWriter), then a fresh
Trainer resuming with ckpt_path="last" for a fourth epoch. The same stages run in one process (float64) and every rank
must have seen the same values.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TESTS_DIR, run_script
from eval_job import run

FLOAT32_METRICS = ("val_acc", "val_mse", "test_acc", "train_mse")  # torchmetrics states are float32: summation order


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def run_layouts(
    tmp_path: Path, cfg: dict[str, Any], reference: dict[str, Any] | None = None, timeout: float = 240
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs ``cfg`` as a multi-process job, and in one process with the stages of ``reference`` (by name) replacing
    its own; returns (per stage, the list of rank results; per stage, the one-process result)."""
    out = tmp_path / "out"
    out.mkdir()
    cfg = {**cfg, "out_dir": str(out), "root_dir": str(tmp_path / "root"), "pg_timeout": 60}
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(cfg))
    code, output = run_script(TESTS_DIR / "eval_job.py", [str(config_path)], timeout)
    if code != 0:
        pytest.fail(f"job failed with exit code {code}:\n{output[-6000:]}")
    ranks = {
        name: [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(cfg["devices"])]
        for name in (stage["name"] for stage in cfg["stages"])
    }
    ref_cfg = copy.deepcopy(cfg)
    ref_cfg.update(devices=1, out_dir=None, root_dir=str(tmp_path / "reference"))
    ref_cfg["stages"] = [copy.deepcopy((reference or {}).get(stage["name"], stage)) for stage in ref_cfg["stages"]]
    for stage in ref_cfg["stages"]:
        stage["strategy"] = None
        stage["progress_bar"] = None
    return ranks, run(ref_cfg)


def assert_metrics_equal(seen: dict[str, float], expected: dict[str, float], what: str, subset: bool = False) -> None:
    if subset:  # a resumed run has not seen the metrics that the epochs before it logged
        expected = {k: v for k, v in expected.items() if k in seen}
    assert list(seen) == list(expected), f"{what}: keys {list(seen)} != {list(expected)}"
    for key, value in expected.items():
        rtol = 1e-6 if key.startswith(FLOAT32_METRICS) else 1e-9
        assert seen[key] == pytest.approx(value, rel=rtol, abs=1e-12), f"{what}: {key} = {seen[key]} != {value}"


def tail(ref: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """The part of an uninterrupted reference run that a resumed run (``like``) covers."""
    return {
        **ref,
        "val": ref["val"][-len(like["val"]) :],
        "train": ref["train"][-len(like["train"]) :],
        "sanity": [],
        "resumed": True,
    }


def assert_same_run(results: list[dict[str, Any]], ref: dict[str, Any], data_parallel: int) -> None:
    for result in results:
        rank = result["rank"]
        assert len(result["val"]) == len(ref["val"]) > 0
        for epoch, (seen, expected) in enumerate(zip(result["val"], ref["val"], strict=True)):
            assert_metrics_equal(seen, expected, f"rank {rank}, validation {epoch}", ref.get("resumed", False))
        for epoch, (seen, expected) in enumerate(zip(result["pbar"], ref["pbar"][-len(result["pbar"]) :], strict=True)):
            assert "val_loss" in seen
            assert_metrics_equal(seen, expected, f"rank {rank}, progress bar {epoch}", ref.get("resumed", False))
        for seen, expected in zip(result["sanity"], ref["sanity"], strict=True):
            if data_parallel == 1:  # the sanity batches are the first two of each replica
                assert_metrics_equal(seen, expected, f"rank {rank}, sanity check")
        assert len(result["sanity"]) == len(ref["sanity"])
        assert len(result["train"]) == len(ref["train"])
        for step, (seen, expected) in enumerate(zip(result["train"], ref["train"], strict=True)):
            assert seen["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-9), f"rank {rank} step {step}"
            assert seen["bar_train_loss"] == pytest.approx(expected["train_loss"], rel=1e-9), f"rank {rank} step {step}"
            assert seen["train_mse_step"] == pytest.approx(expected["train_mse_step"], rel=1e-6)
            if data_parallel == 1:
                assert seen["loss"] == pytest.approx(expected["loss"], rel=1e-9)
        for kind in ("checkpoint", "early_stopping"):
            seen_cb, expected_cb = result[kind], ref[kind]
            for key, value in expected_cb.items():
                if isinstance(value, float):
                    assert seen_cb[key] == pytest.approx(value, rel=1e-9), f"rank {rank} {kind}.{key}"
                elif isinstance(value, dict):
                    assert list(seen_cb[key]) == list(value)
                    assert list(seen_cb[key].values()) == pytest.approx(list(value.values()), rel=1e-9)
                else:
                    assert seen_cb[key] == value, f"rank {rank} {kind}.{key}"
        assert (result["epoch"], result["global_step"]) == (ref["epoch"], ref["global_step"])


def _csv_rows(root: Path) -> list[dict[str, str]]:
    """The rows that the first stage's CSVLogger wrote (fit, validate, test)."""
    with (root / "logs" / "csv" / "version_0" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


LAYOUTS = [
    pytest.param(2, {"pipeline_parallel_size": 2, "micro_batches": 4}, "tqdm", id="P2-M4-tqdm"),
    pytest.param(
        4, {"pipeline_parallel_size": 2, "micro_batches": 2, "rank_layout": "pp_contiguous"}, "rich", id="P2xD2-M2-rich"
    ),
]


@pytest.mark.parametrize(("devices", "strategy", "progress_bar"), LAYOUTS)
def test_evaluation_logging_callbacks_match_one_process(tmp_path, devices, strategy, progress_bar) -> None:
    if progress_bar == "rich" and not _has("rich"):
        progress_bar = "tqdm"
    loggers = ["csv", "tensorboard"] if _has("tensorboard") or _has("tensorboardX") else ["csv"]
    data_parallel = devices // strategy["pipeline_parallel_size"]
    fit = {
        "strategy": strategy,
        "model": {"lr": 0.02},
        "callbacks": ["checkpoint", "early_stopping", "lr_monitor"],
        "loggers": loggers,
        "progress_bar": progress_bar,
    }
    cfg = {
        "devices": devices,
        "data": {"train_size": 32, "batch_size": 8, "val_size": 26, "val_batch_size": 6, "predict_size": 20},
        "stages": [
            {
                **fit,
                "name": "fit",
                "trainer": {
                    "max_epochs": 3,
                    "limit_val_batches": 1.0,
                    "num_sanity_val_steps": 2,
                    "log_every_n_steps": 1,
                },
                "actions": [["fit", None], ["validate", "best"], ["test", None], ["predict", None]],
            },
            {
                **fit,
                "name": "resume",
                "trainer": {"max_epochs": 4, "limit_val_batches": 1.0, "log_every_n_steps": 1},
                "actions": [["fit", "last"]],
            },
        ],
    }
    # Lightning's one-device strategy loads a checkpoint before converting the module to float64 (so a one-process
    # resume is not exact): the reference of the resumed run is the uninterrupted run.
    uninterrupted = {
        **fit,
        "name": "resume",
        "checkpoint_dir": "uninterrupted",
        "trainer": {"max_epochs": 4, "limit_val_batches": 1.0, "log_every_n_steps": 1},
        "actions": [["fit", None]],
    }
    ranks, ref = run_layouts(tmp_path, cfg, {"resume": uninterrupted})

    # 1, 2, 3, 4: every rank logged what one process logs, epoch by epoch, and the callbacks decided the same
    assert_same_run(ranks["fit"], ref["fit"], data_parallel)
    for result in ranks["fit"]:
        validate, test = result["actions"][1:3]
        for kind, action in (("validate", validate), ("test", test)):
            expected = ref["fit"]["actions"][1 if kind == "validate" else 2]
            assert len(action["returned"]) == 1
            assert_metrics_equal(action["returned"][0], expected["returned"][0], f"rank {result['rank']} {kind}")
        # validate(ckpt_path="best") loaded the best sharded checkpoint: its val_loss is the best score
        assert validate["returned"][0]["val_loss"] == pytest.approx(result["checkpoint"]["best_score"], rel=1e-9)

    # 1: trainer.predict returns the whole batches' predictions, and the writer gets them, on every rank
    reference = torch.cat(ref["fit"]["actions"][3]["returned"])
    covered = torch.full_like(reference, float("nan"))
    for result in ranks["fit"]:
        returned = torch.cat(result["actions"][3]["returned"])
        written = result["written_epoch"]
        assert torch.equal(torch.cat([p for _, p in written]), returned)
        assert torch.equal(torch.cat([p for _, p in result["written"]]), returned)
        indices = torch.tensor([i for batch, _ in written for i in batch])
        torch.testing.assert_close(returned, reference[indices], rtol=1e-9, atol=1e-12)
        covered[indices] = returned
        if data_parallel == 1:
            torch.testing.assert_close(returned, reference, rtol=1e-9, atol=1e-12)
    assert not covered.isnan().any()

    # 4: ckpt_path="last" resumed the run: the fourth epoch equals one process's
    assert_same_run(ranks["resume"], tail(ref["resume"], ranks["resume"][0]), data_parallel)

    # 4: loggers (rank 0 writes them) hold the one-process values, LearningRateMonitor included
    rows, ref_rows = _csv_rows(tmp_path / "root"), _csv_rows(tmp_path / "reference")
    lr = [float(r["lr-SGD"]) for r in rows if r.get("lr-SGD")]
    assert lr and lr == pytest.approx([float(r["lr-SGD"]) for r in ref_rows if r.get("lr-SGD")], rel=1e-12)
    for key in ("train_loss", "val_loss", "test_loss"):
        logged = [float(r[key]) for r in rows if r.get(key)]
        assert logged and logged == pytest.approx([float(r[key]) for r in ref_rows if r.get(key)], rel=1e-9), key
    if "tensorboard" in loggers:
        assert list((tmp_path / "root" / "logs" / "tb").glob("version_*/events.out.tfevents.*"))

    # 5 (with test_checkpoint.py): top-k removal deleted whole checkpoint directories; last.ckpt is a directory
    files = ranks["fit"][0]["checkpoint"]["files"]
    assert files == ref["fit"]["checkpoint"]["files"] and "last.ckpt" in files
    checkpoints = tmp_path / "root" / "checkpoints"
    assert all((checkpoints / name).is_dir() for name in files)
    shutil.rmtree(tmp_path / "root", ignore_errors=True)


def test_recorder_combines_micro_batches_by_reduce_fx_and_replays_metrics() -> None:
    from torch import nn
    from torchmetrics.classification import BinaryAccuracy

    from lightning_bfpp.lightning.log_relay import LogCall, LogRecorder, MetricCounts, replay

    class Module(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.acc = BinaryAccuracy()
            self.logged: list[tuple[Any, ...]] = []

        def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            self.logged.append((name, value, kwargs))

        def hook(self, m: int) -> None:
            self.log("loss", torch.tensor(1.0 + 2 * m, dtype=torch.float64))
            self.log("count", 2, reduce_fx="sum", batch_size=2)
            self.log("worst", torch.tensor([5.0, 3.0][m]), reduce_fx=torch.max)
            self.acc(torch.tensor([1, 1]), torch.tensor([1, m]))  # accuracy 1.0, then 0.5
            self.log("acc", self.acc)

    last, recorder = Module(), LogRecorder()
    for m in range(2):
        with recorder.capture(last):
            last.hook(m)
    calls = recorder.calls()
    assert calls[0] == MetricCounts((("acc", 2),), added=(("acc", 2),))
    by_name = {c.name: c for c in calls[1:]}
    assert list(by_name) == ["loss", "count", "worst", "acc"]
    assert (by_name["loss"].value, by_name["loss"].dtype) == (2.0, torch.float64)
    assert (by_name["count"].value, by_name["count"].dtype, dict(by_name["count"].kwargs)["batch_size"]) == (
        4.0,
        None,
        4,
    )
    assert (by_name["worst"].value, by_name["worst"].dtype) == (5.0, torch.float32)
    assert by_name["acc"] == LogCall("acc", 0.75, None, (), (), "acc")
    assert all(isinstance(by_name[n].value, torch.Tensor) for n in ("loss", "worst", "acc"))  # not read on the host

    other = Module()  # a rank of the pipeline that did not run the hook
    replay(other, calls, torch.device("cpu"))
    assert [name for name, _, _ in other.logged] == ["loss", "count", "worst", "acc"]
    _, metric, kwargs = other.logged[-1]
    assert metric is other.acc and kwargs == {"metric_attribute": "acc"}
    assert other.acc._update_count == 2 and float(other.acc._forward_cache) == 0.75


def test_step_relay_values_survive_the_tensor_path_exactly() -> None:
    """What the last stage logged reaches the other ranks unchanged when only the values travel (as float64): the
    loss in its dtype, every value, a Metric's missing step value, the batch's metric updates; a changed option is
    noticed."""
    from lightning_bfpp.lightning.log_relay import DeferredError, LogCall, MetricCounts
    from lightning_bfpp.lightning.step_relay import _join, _pack, _split

    calls = [
        MetricCounts((("acc", 3),), added=(("acc", 2),)),
        LogCall("loss", torch.tensor(0.1 + 0.2, dtype=torch.float32), torch.float32, (), (("prog_bar", True),)),
        LogCall("acc", None, None, (), (), "acc"),
        LogCall("n", 12.0, None, (), (("reduce_fx", "sum"),)),
    ]
    loss = torch.tensor(1 / 3, dtype=torch.bfloat16)
    layout, values = _split(loss, calls)
    sent = _pack(1.0, values, torch.device("cpu"))
    assert sent.dtype == torch.float64 and sent[0] == 1.0
    joined_loss, joined_calls = _join(layout, sent[1:])
    assert joined_loss.dtype == torch.bfloat16 and joined_loss.item() == loss.item()
    assert joined_calls[0] == MetricCounts((("acc", 2),), relative=True)  # the batch's updates, added on arrival
    assert joined_calls[1:] == calls[1:]
    assert joined_calls[1].value.item() == calls[1].value.double().item()
    changed = [*calls[:3], LogCall("n", 12.0, None, (), (("reduce_fx", "max"),))]
    assert _split(loss, changed)[0] != layout
    # a collective refused in a later step: the error changes the layout (so it travels) and survives the join
    failed = [*calls, DeferredError("all_gather inside pipeline_loss")]
    failed_layout, failed_values = _split(loss, failed)
    assert failed_layout != layout and len(failed_values) == len(values)
    assert _join(failed_layout, sent[1:])[1][-1] == failed[-1]


def test_evaluation_results_merge_per_micro_batch() -> None:
    from lightning_bfpp.run.microbatch import merge_outputs

    parts = [
        {"loss": torch.tensor(1.0), "pred": torch.ones(2, 3), "ids": ["a", "b"], "pair": (torch.zeros(2), 1.0)},
        {"loss": torch.tensor(3.0), "pred": torch.zeros(2, 3), "ids": ["c", "d"], "pair": (torch.ones(2), 2.0)},
    ]
    merged = merge_outputs(parts)
    assert float(merged["loss"]) == 2.0 and merged["pred"].shape == (4, 3) and merged["ids"] == ["a", "b", "c", "d"]
    assert torch.equal(merged["pair"][0], torch.tensor([0.0, 0.0, 1.0, 1.0])) and merged["pair"][1] == 1.5
    assert merge_outputs([None, None]) is None and merge_outputs([]) is None
