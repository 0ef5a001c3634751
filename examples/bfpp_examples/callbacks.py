"""A callback that reports the loss and the training throughput on rank 0."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl

log = logging.getLogger(__name__)


class Throughput(pl.Callback):
    """Reports progress on rank 0 and logs ``<unit>_per_s``.

    Every ``interval`` optimizer steps it prints the step, the mean loss of the batches since the last report (rank
    0's replica), the other training metrics (``train_*``, last values) and the throughput of the whole job
    (``unit``/s, all data-parallel replicas together); after each validation, the validation metrics (``val_*``);
    at the end of training, the mean throughput.

    Throughput counts the time spent in training batches (forward, backward, optimizer step), not validation.

    Arguments:
        units_per_sample: what one sample counts for (e.g. its sequence length for tokens).
        unit: the name of what is counted ("tokens", "samples").
        interval: the number of optimizer steps between reports.
    """

    def __init__(self, units_per_sample: int = 1, unit: str = "samples", interval: int = 10) -> None:
        self.units_per_sample, self.unit, self.interval = units_per_sample, unit, max(1, interval)
        self._batch_start = 0.0
        self._window_time = self._window_units = 0.0
        self._total_time = self._total_units = 0.0  # after the first report
        self._all_time = self._all_units = 0.0
        self._window_loss: list[float] = []
        self._last_step = -1

    def _replicas(self, trainer: pl.Trainer) -> int:
        kwargs = trainer.distributed_sampler_kwargs
        return int(kwargs["num_replicas"]) if kwargs else 1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._batch_start
        samples = _batch_size(batch) * self._replicas(trainer)
        units = samples * self.units_per_sample
        self._window_time += elapsed
        self._window_units += units
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._window_loss.append(float(loss))
        self._all_time += elapsed
        self._all_units += units
        step = trainer.global_step
        if step == self._last_step or step % self.interval:
            return
        self._last_step = step
        rate = self._window_units / max(self._window_time, 1e-9)
        # The first window includes start-up (first allocations, warm-up of the pipeline): leave it out of the mean.
        if step > self.interval:
            self._total_time += self._window_time
            self._total_units += self._window_units
        losses, self._window_loss = self._window_loss, []
        self._window_time = self._window_units = 0.0
        pl_module.log(f"{self.unit}_per_s", rate)
        if trainer.is_global_zero:
            loss_text = f"loss {sum(losses) / len(losses):.4f} | " if losses else ""
            metrics = _metrics(trainer, "train_", exclude=("train_loss",))
            max_steps = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
            log.info(f"step {step}{max_steps} | {loss_text}{metrics}{rate:,.0f} {self.unit}/s")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = _metrics(trainer, "val_")
        if metrics:
            log.info(f"validation at step {trainer.global_step} | {metrics[:-3]}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        rate = self.mean_rate
        if trainer.is_global_zero and rate is not None:
            log.info(f"mean throughput {rate:,.0f} {self.unit}/s")

    @property
    def mean_rate(self) -> float | None:
        """The mean throughput after the first report (over all batches when there was only one report)."""
        if self._total_time > 0:
            return self._total_units / self._total_time
        return self._all_units / self._all_time if self._all_time > 0 else None


def _metrics(trainer: pl.Trainer, prefix: str, exclude: tuple[str, ...] = ()) -> str:
    """``"name value | "`` for each scalar metric whose name starts with ``prefix`` (except ``exclude``)."""
    items = sorted(
        (k, float(v))
        for k, v in trainer.callback_metrics.items()
        if k.startswith(prefix) and k not in exclude and v.numel() == 1
    )
    return "".join(f"{k} {v:.4f} | " for k, v in items)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    return int(batch.shape[0])
