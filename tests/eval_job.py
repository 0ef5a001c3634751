"""Runs a sequence of Lightning stages (fit / validate / test / predict / save / convert) from a
:class:`job_spec.EvalJobSpec` (read from JSON), with callbacks, loggers, progress bars, torchmetrics and checkpoints;
run as a script (one process per rank) or called in-process for the one-process reference.

The spec: ``devices``, ``out_dir``, ``root_dir``, ``seed``, ``data`` (sizes and batch sizes) and ``stages``, each run
with a fresh module and Trainer (given as dicts)::

    {"name": "fit", "strategy": {...} or None, "model": {...}, "trainer": {...}, "callbacks": [...],
     "loggers": [...], "progress_bar": "tqdm" | "rich" | None, "actions": [["fit", ckpt_path], ["validate", "best"],
     ["test", None], ["predict", None], ["save", path]]}

``fit_error`` and ``save_error`` run ``fit`` and ``save`` expecting an error, which is recorded; ``fill_disk`` fills
the file system of a path.

Each rank writes ``<stage name>.rank<global rank>.pt`` to ``out_dir`` with what it saw (see :func:`run_stage`).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics import MeanSquaredError
from torchmetrics.classification import BinaryAccuracy

sys.path.insert(0, str(Path(__file__).resolve().parent))

from job_spec import EvalDataSpec, EvalJobSpec, StageSpec
from models import RegressionData, StackModel
from run_job import full_tensor

from lightning_bfpp import BFPPStrategy


class MetricModel(StackModel):
    """:class:`StackModel` with torchmetrics (logged as objects from the last-stage hooks and computed in an
    epoch-end hook), several kinds of ``self.log`` calls, and an LR scheduler."""

    def __init__(self, scheduler: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.train_mse = MeanSquaredError(dist_sync_on_step=True)  # step values over the replicas too
        self.val_acc = BinaryAccuracy()
        self.val_mse = MeanSquaredError()
        self.test_acc = BinaryAccuracy()

    def pipeline_loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        loss = super().pipeline_loss(outputs, batch)  # logs train_loss (prog_bar, sync_dist)
        self.train_mse(outputs.squeeze(-1), batch["y"])
        self.log("train_mse", self.train_mse, on_step=True, on_epoch=True)
        return loss

    def _evaluate(self, batch: dict[str, Tensor], prefix: str, accuracy: BinaryAccuracy) -> Tensor:
        pred = self(batch).squeeze(-1)
        loss = F.mse_loss(pred, batch["y"])
        self.log(f"{prefix}_loss", loss, prog_bar=True, sync_dist=True)
        accuracy(pred > 0, batch["y"] > 0)
        self.log(f"{prefix}_acc", accuracy)  # a Metric object: computed over the epoch, exact
        self.log_dict({f"{prefix}_max_err": (pred - batch["y"]).abs().max()}, reduce_fx="max", sync_dist=True)
        self.log(f"{prefix}_samples", float(len(pred)), reduce_fx="sum", sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self.val_mse.update(self(batch).squeeze(-1), batch["y"])
        return self._evaluate(batch, "val", self.val_acc)

    def on_validation_epoch_end(self) -> None:
        # runs on every rank: compute() gathers the last stage's states everywhere
        self.log("val_mse", self.val_mse.compute())
        self.val_mse.reset()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        if not self.hparams.scheduler:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.7)}


class Data(pl.LightningDataModule):
    """Fixed-order data; each data-parallel replica takes every D-th sample, so a global batch of the training set
    is the same samples whatever D is."""

    def __init__(self, spec: EvalDataSpec, data_parallel: int) -> None:
        super().__init__()
        self.spec, self.D = spec, data_parallel

    def _loader(self, size: int, batch_size: int, seed: int, drop_last: bool) -> DataLoader:
        data = RegressionData(size=size, seed=seed)
        replicas = self.trainer.distributed_sampler_kwargs or {"num_replicas": 1, "rank": 0}
        sampler = DistributedSampler(data, shuffle=False, drop_last=drop_last, **replicas)
        return DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=drop_last)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.spec.train_size, self.spec.batch_size // self.D, 0, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.spec.val_size, self.spec.val_batch_size, 1, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.spec.test_size, self.spec.val_batch_size, 2, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.spec.predict_size, self.spec.predict_batch_size, 3, False)


class Recorder(pl.Callback):
    """What this rank sees: per training batch the logged loss; per validation epoch the callback metrics."""

    def __init__(self) -> None:
        self.train: list[dict[str, float]] = []
        self.val: list[dict[str, float]] = []
        self.sanity: list[dict[str, float]] = []
        self.pbar: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = trainer.callback_metrics
        self.train.append({"loss": float(outputs["loss"]), "train_loss": float(metrics["train_loss"])})
        self.train[-1]["bar_train_loss"] = float(trainer.progress_bar_metrics["train_loss"])  # prog_bar=True
        if "train_mse_step" in metrics:
            self.train[-1]["train_mse_step"] = float(metrics["train_mse_step"])

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (self.sanity if trainer.sanity_checking else self.val).append(metrics)
        if not trainer.sanity_checking:  # what the progress bar shows (prog_bar=True values)
            self.pbar.append({k: float(v) for k, v in trainer.progress_bar_metrics.items()})


class Writer(BasePredictionWriter):
    def __init__(self) -> None:
        super().__init__(write_interval="batch_and_epoch")
        self.batches: list[tuple[list[int], Tensor]] = []
        self.epoch: list[Any] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.batches.append((list(batch_indices), prediction.detach().cpu()))

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        self.epoch = [(list(i), p.detach().cpu()) for i, p in zip(batch_indices[0], predictions, strict=True)]


def _callbacks(names: list[str], root: Path, stage: StageSpec) -> dict[str, pl.Callback]:
    callbacks: dict[str, pl.Callback] = {"recorder": Recorder(), "writer": Writer()}
    if "checkpoint" in names:
        callbacks["checkpoint"] = ModelCheckpoint(
            dirpath=root / stage.checkpoint_dir, monitor="val_loss", save_top_k=2, save_last=True
        )
    if "early_stopping" in names:
        callbacks["early_stopping"] = EarlyStopping(monitor="val_loss", patience=2, min_delta=1e-4)
    if "lr_monitor" in names:
        callbacks["lr_monitor"] = LearningRateMonitor(logging_interval="step")
    if stage.progress_bar == "rich":
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks["progress_bar"] = RichProgressBar()
    elif stage.progress_bar == "tqdm":
        from lightning.pytorch.callbacks import TQDMProgressBar

        callbacks["progress_bar"] = TQDMProgressBar()
    return callbacks


def _loggers(names: list[str], root: Path) -> list[Any] | bool:
    loggers: list[Any] = []
    if "csv" in names:
        from lightning.pytorch.loggers import CSVLogger

        loggers.append(CSVLogger(root / "logs", name="csv"))
    if "tensorboard" in names:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(root / "logs", name="tb"))
    return loggers or False


def _floats(metrics: Any) -> Any:
    if isinstance(metrics, list):
        return [_floats(m) for m in metrics]
    return {k: float(v) for k, v in metrics.items()}


def _fill(path: Path) -> None:
    """Writes ``path`` until its file system has no space left."""
    with open(path, "wb", buffering=0) as stream:
        try:
            while True:
                stream.write(b"\0" * 4096)
        except OSError:
            pass


def run_stage(spec: EvalJobSpec, stage: StageSpec) -> dict[str, Any]:
    """Runs one stage; returns (and, with ``out_dir``, saves per rank) what this rank saw."""
    pl.seed_everything(spec.seed, verbose=False)
    root, devices = Path(spec.root_dir), spec.devices
    strategy_kwargs = stage.strategy
    strategy: Any = "auto"
    data_parallel = 1
    if strategy_kwargs is not None:
        strategy = BFPPStrategy(timeout=timedelta(seconds=spec.pg_timeout), **strategy_kwargs)
        data_parallel = devices // strategy_kwargs.get("pipeline_parallel_size", devices)
    model = MetricModel(**stage.model)
    callbacks = _callbacks(stage.callbacks, root, stage)
    trainer_kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": devices if strategy_kwargs is not None else 1,
        "strategy": strategy,
        "precision": "64-true",
        "max_epochs": 1,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "enable_checkpointing": "checkpoint" in callbacks,
        "enable_progress_bar": stage.progress_bar is not None,
        "enable_model_summary": False,
        "logger": _loggers(stage.loggers, root),
        "callbacks": list(callbacks.values()),
        "use_distributed_sampler": False,
        "default_root_dir": str(root),
        **stage.trainer,
    }
    trainer = pl.Trainer(**trainer_kwargs)
    data = Data(spec.data, data_parallel)
    result: dict[str, Any] = {"actions": []}
    for kind, arg in stage.actions:
        if arg is not None and arg not in ("last", "best"):
            arg = str(root / arg)  # paths are relative to root_dir
        if kind == "fit":
            trainer.fit(model, datamodule=data, ckpt_path=arg)
            result["actions"].append({"kind": kind, "metrics": _floats(trainer.callback_metrics)})
        elif kind in ("validate", "test"):
            out = getattr(trainer, kind)(model, datamodule=data, ckpt_path=arg)
            result["actions"].append(
                {"kind": kind, "returned": _floats(out), "metrics": _floats(trainer.callback_metrics)}
            )
        elif kind == "predict":
            out = trainer.predict(model, datamodule=data, ckpt_path=arg)
            result["actions"].append({"kind": kind, "returned": [p.detach().cpu() for p in out]})
        elif kind == "save":
            trainer.save_checkpoint(arg)
        elif kind in ("fit_error", "save_error"):  # an action expected to fail on every rank: its error, recorded
            try:
                trainer.fit(model, datamodule=data, ckpt_path=arg) if kind == "fit_error" else trainer.save_checkpoint(
                    arg
                )
                error = None
            except Exception as raised:
                error = f"{type(raised).__name__}: {raised}"
                trainer.strategy.failed = False  # agreed by every rank: no collective is left waiting
            result["actions"].append({"kind": kind, "error": error})
        elif kind == "fill_disk":  # rank 0 fills the file system of `arg` (a file it creates there)
            if trainer.is_global_zero:
                _fill(Path(arg))
            trainer.strategy.barrier()
        elif kind == "convert":  # in-process conversion on rank 0, while the other ranks wait
            if trainer.is_global_zero:
                from lightning_bfpp.convert import to_state_dict

                result["converted"] = to_state_dict(arg)
            trainer.strategy.barrier()
        else:
            raise ValueError(kind)
    recorder, writer = callbacks["recorder"], callbacks["writer"]
    result.update(
        rank=trainer.global_rank,
        train=recorder.train,
        val=recorder.val,
        sanity=recorder.sanity,
        pbar=recorder.pbar,
        written=writer.batches,
        written_epoch=writer.epoch,
        state={k: full_tensor(v).detach().cpu().clone() for k, v in model.state_dict().items()},
        epoch=trainer.current_epoch,
        global_step=trainer.global_step,
    )
    if "checkpoint" in callbacks:
        ckpt = callbacks["checkpoint"]
        result["checkpoint"] = {
            "best_score": float(ckpt.best_model_score) if ckpt.best_model_score is not None else None,
            "best": Path(ckpt.best_model_path).name,
            "last": Path(ckpt.last_model_path).name,
            "top_k": {Path(k).name: float(v) for k, v in ckpt.best_k_models.items()},
            "files": sorted(p.name for p in Path(ckpt.dirpath).iterdir()),
        }
    if "early_stopping" in callbacks:
        early = callbacks["early_stopping"]
        result["early_stopping"] = {"best": float(early.best_score), "wait": early.wait_count}
    if spec.out_dir:
        torch.save(result, Path(spec.out_dir) / f"{stage.name}.rank{trainer.global_rank}.pt")
    return result


def run(config: EvalJobSpec | dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Runs the stages of ``config`` (a spec, or a dict of its fields) in order; returns what this rank saw."""
    spec = EvalJobSpec.from_dict(config)
    return {stage.name: run_stage(spec, stage) for stage in spec.stages}


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    run(EvalJobSpec.from_dict(json.loads(Path(sys.argv[1]).read_text())))
