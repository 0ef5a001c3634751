"""Trains a test model from a :class:`job_spec.TrainJobSpec` (read from JSON when run as a script, one process per
rank; a spec or a dict when called in-process).

Each rank writes ``rank<global rank>.pt`` to the spec's ``out_dir``: the losses and logged values it saw per
training batch, and its share of the parameters under their global names.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Checkpoint, ModelSummary, RichModelSummary
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.tuner import Tuner
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))

from collective_count import ReductionLog, count_fsdp_collectives
from host_read_probe import HostReadProbe
from job_spec import TrainJobSpec
from models import MODELS, TokenData, loader

from lightning_bfpp import BFPPStrategy
from lightning_bfpp.run.nccl_order_link import NcclOrderLink


class OrderedData(pl.LightningDataModule):
    """The test data in a fixed order, split over the data-parallel replicas without shuffling, so that the global
    batch of step ``k`` is the same samples whatever the number of replicas. With ``shuffled``, a plain shuffling
    loader instead, for Lightning to replace with its ``DistributedSampler`` (``use_distributed_sampler=True``)."""

    def __init__(
        self,
        batch_size: int,
        size: int,
        variable_length: bool = False,
        tokens: dict[str, int] | None = None,
        shuffled: bool = False,
        dataset: str | None = None,
    ) -> None:
        super().__init__()
        self.batch_size, self.size, self.variable_length, self.shuffled = batch_size, size, variable_length, shuffled
        self.tokens = tokens  # {"seq_len": ..., "vocab": ...}: language-model samples instead of regression ones
        self.dataset = dataset  # "module:function" making the dataset from its size; default: RegressionData

    def train_dataloader(self) -> DataLoader:
        if self.shuffled:
            return DataLoader(loader(self.batch_size, size=self.size).dataset, self.batch_size, shuffle=True)
        replicas = self.trainer.distributed_sampler_kwargs or {"num_replicas": 1, "rank": 0}
        if self.variable_length:
            return variable_length_batches(self.batch_size, replicas["num_replicas"], replicas["rank"])
        if self.tokens:
            data = TokenData(self.size, **self.tokens)
        elif self.dataset:
            data = imported(self.dataset)(self.size)
        else:
            data = loader(self.batch_size, size=self.size).dataset
        sampler = DistributedSampler(data, shuffle=False, drop_last=True, **replicas)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()


def variable_length_batches(batch_size: int, replicas: int, rank: int, steps: int = 8) -> DataLoader:
    """Sequence batches whose length changes from step to step; replica ``rank`` gets its rows of each global batch."""
    g = torch.Generator().manual_seed(3)
    batches = []
    for step in range(steps):
        length, rows = 2 + step % 3, batch_size * replicas
        x = torch.randn(rows, length, 4, generator=g, dtype=torch.float64)
        batch = {
            "x": x,
            "y": torch.sin(x.sum(-1)),
            "mask": (torch.rand(rows, length, 8, generator=g) > 0.2).to(torch.float64),
        }
        batches.append({k: v[rank * batch_size : (rank + 1) * batch_size] for k, v in batch.items()})
    return DataLoader(batches, batch_size=None)


class Recorder(pl.Callback):
    """Keeps, per training batch, the returned loss and the logged ``train_loss`` as this rank sees them."""

    def __init__(self, record_initial: bool = False) -> None:
        self.losses: list[float] = []
        self.logged: list[float] = []
        self.record_initial = record_initial
        self.initial: dict[str, torch.Tensor] | None = None
        self.param_bytes: int | None = None
        self.allocated_before_setup: list[str] = []
        self.batched_linears = 0  # Linear modules whose weight gradients the strategy batches
        self.targets: list[list[float]] = []  # the targets of each training batch: which samples this rank read

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return  # a validation after the fit sets up again
        # before the strategy's set-up: the parameters that already have storage
        self.allocated_before_setup = [name for name, p in pl_module.named_parameters() if not p.is_meta]

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        pipeline = getattr(trainer.strategy, "pipeline", None)
        batcher = pipeline.weight_gradients if pipeline is not None else None
        self.batched_linears = batcher.num_layers if batcher is not None else 0
        if self.record_initial:  # the weights before the first step, and the bytes of this rank's parameters
            self.initial = {k: full_tensor(v).detach().cpu().clone() for k, v in pl_module.state_dict().items()}
            self.param_bytes = sum(p.numel() * p.element_size() for p in pl_module.parameters())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))
        if "y" in batch:  # regression data: which samples this rank read
            self.targets.append(batch["y"].tolist())
        self.logged.append(float(trainer.callback_metrics["train_loss"]))


class AutocastRecorder(pl.Callback):
    """Records, during the training steps, the output dtype of every ``nn.Linear`` forward and whether autocast was
    on during the backward through it."""

    def __init__(self) -> None:
        self.output_dtypes: set[str] = set()
        self.backward_autocast: set[bool] = set()
        self._recording = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        def record(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if self._recording:
                self.output_dtypes.add(str(output.dtype))
                if output.requires_grad:
                    output.register_hook(lambda grad: self.backward_autocast.add(torch.is_autocast_enabled("cpu")))

        for module in pl_module.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(record)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._recording = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._recording = False


@contextmanager
def printed_summary() -> Iterator[dict[str, str]]:
    """Yields a dict whose ``"text"`` is, after the block, what the summary callbacks printed inside it:
    ``ModelSummary``'s log record and ``RichModelSummary``'s console output (on a console wide enough for every
    column)."""
    from rich import get_console

    printed: dict[str, str] = {}
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("lightning.pytorch.callbacks.model_summary")
    logger.addHandler(handler)
    console = get_console()
    width, console.width = console.width, 300
    try:
        with console.capture() as rich_output:
            yield printed
    finally:
        logger.removeHandler(handler)
        console.width = width
    printed["text"] = stream.getvalue() + rich_output.get()


class KeepsPrintedSummary:
    """Mixed into a Lightning summary callback: shows every module and keeps what it prints in ``text``."""

    def __init__(self) -> None:
        super().__init__(max_depth=-1)  # type: ignore[call-arg]
        self.text: str | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        with printed_summary() as printed:
            super().on_fit_start(trainer, pl_module)  # type: ignore[misc]
        self.text = printed["text"]


class PrintedModelSummary(KeepsPrintedSummary, ModelSummary):
    """Lightning's ``ModelSummary``, its text kept."""


class PrintedRichModelSummary(KeepsPrintedSummary, RichModelSummary):
    """Lightning's ``RichModelSummary``, its text kept."""


def precision_arguments(precision: str, scaler: dict[str, Any]) -> dict[str, Any]:
    """The Trainer's ``precision``; ``16-mixed``, which Lightning refuses on CPU by name, as the mixed-precision
    plugin with a CPU gradient scaler (``scaler``: its keyword arguments)."""
    if precision != "16-mixed":
        return {"precision": precision}
    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", **scaler))]}


class SavedBytes(pl.Callback):
    """Adds up the bytes of the non-parameter tensors autograd saves for backward during the training steps."""

    def __init__(self) -> None:
        self.total = 0
        self._hooks: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        params = {p.untyped_storage().data_ptr() for p in pl_module.parameters()}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.untyped_storage().data_ptr() not in params:
                self.total += tensor.numel() * tensor.element_size()
            return tensor

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        self._hooks.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._hooks.__exit__(None, None, None)


class StepMarks(pl.Callback):
    """Marks the start of each training batch and each optimizer step (after the pipelined step, before clipping)
    in a :class:`ReductionLog`."""

    def __init__(self, log: ReductionLog) -> None:
        self.reductions = log

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.reductions.events.append(("batch", batch_idx))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.reductions.events.append(("step",))


def imported(name: str) -> Any:
    """The object ``module:attribute`` of a module importable from this folder."""
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


def stock_callbacks(names: list[str], out_dir: str | None) -> list[pl.Callback]:
    """Lightning's callbacks by class name, with arguments that make them act within a few steps of the test data."""
    from lightning.pytorch import callbacks as cb

    root = out_dir or "."
    made: dict[str, Any] = {
        "DeviceStatsMonitor": lambda: cb.DeviceStatsMonitor(cpu_stats=True),
        "EarlyStopping": lambda: cb.EarlyStopping("val_loss", patience=3, min_delta=1.0),
        "GradientAccumulationScheduler": lambda: cb.GradientAccumulationScheduler({1: 2}),
        "LambdaCallback": lambda: cb.LambdaCallback(on_train_batch_end=lambda *args: None),
        "LearningRateMonitor": lambda: cb.LearningRateMonitor("step"),
        "ModelCheckpoint": lambda: cb.ModelCheckpoint(Path(root, "checkpoints"), monitor="val_loss", save_last=True),
        "ModelSummary": lambda: cb.ModelSummary(max_depth=2),
        "RichModelSummary": lambda: cb.RichModelSummary(max_depth=2),
        "RichProgressBar": cb.RichProgressBar,
        "TQDMProgressBar": cb.TQDMProgressBar,
        "SpikeDetection": lambda: cb.SpikeDetection(
            mode="min", window=2, warmup=2, atol=None, rtol=0.05, exclude_batches_path=str(Path(root, "skip.json"))
        ),
        "ThroughputMonitor": lambda: cb.ThroughputMonitor(batch_size_fn=lambda batch: batch["x"].shape[0]),
        "Timer": lambda: cb.Timer({"hours": 1}),
        "BackboneFinetuning": lambda: cb.BackboneFinetuning(unfreeze_backbone_at_epoch=1),
        "StochasticWeightAveraging": lambda: cb.StochasticWeightAveraging(swa_lrs=0.01),
        "EMAWeightAveraging": cb.EMAWeightAveraging,
        "WeightAveraging": cb.WeightAveraging,
        "ModelPruning": lambda: cb.ModelPruning("l1_unstructured", amount=0.5),
        "LearningRateFinder": lambda: cb.LearningRateFinder(num_training_steps=3),
        "BatchSizeFinder": lambda: cb.BatchSizeFinder(max_trials=2),
        "OnExceptionCheckpoint": lambda: cb.OnExceptionCheckpoint(root),
        "UserEMA": lambda: type("UserEMA", (cb.EMAWeightAveraging,), {})(),
    }
    return [made[name]() for name in names]


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter sharded over the data-parallel replicas (every replica must call this)."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def run(config: TrainJobSpec | dict[str, Any]) -> dict[str, Any]:
    """Trains as ``config`` says (a spec, or a dict of its fields) on this rank; returns what this rank saw."""
    spec = TrainJobSpec.from_dict(config).for_rank(os.environ.get("LOCAL_RANK", "0"))
    pl.seed_everything(spec.seed, verbose=False)
    build_on = spec.build_on  # None; "init_module" (empty_init as the spec says); "meta"

    def build() -> pl.LightningModule:
        name = spec.model_class
        return (imported(name) if ":" in name else MODELS[name])(**spec.model)

    model = build() if build_on is None else None
    strategy_kwargs = spec.strategy
    strategy: Any = "auto"
    if isinstance(strategy_kwargs, str):
        strategy = strategy_kwargs
    elif strategy_kwargs is not None:
        options = {"timeout": timedelta(seconds=spec.pg_timeout), "timeline_dir": spec.timeline_dir, **strategy_kwargs}
        strategy = BFPPStrategy(**options)
        if spec.emulate_nccl_streams:  # "rank": NCCL's transfer order on the group's one stream, over gloo
            strategy.link_class = NcclOrderLink
    recorder = Recorder(spec.record_initial)
    saved = SavedBytes() if spec.count_saved_bytes else None  # what the training steps keep for backward
    autocast = AutocastRecorder() if spec.record_autocast else None
    reductions = ReductionLog() if spec.record_reductions and isinstance(strategy, BFPPStrategy) else None
    if reductions is not None:
        reductions.install()
    summaries = [PrintedModelSummary(), PrintedRichModelSummary()] if spec.summary else []
    host_reads = HostReadProbe() if spec.count_host_reads else None
    extra_callbacks = stock_callbacks(spec.callbacks, spec.out_dir)
    trainer_options = {
        "max_steps": spec.max_steps,
        "limit_val_batches": None if spec.validate_after else 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": CSVLogger(spec.out_dir) if spec.csv_logger else False,
        **spec.trainer,  # Trainer features: fast_dev_run, max_epochs, val_check_interval, ...
    }
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=spec.devices,
        strategy=strategy,
        **precision_arguments(spec.precision, spec.scaler),
        accumulate_grad_batches=spec.accumulate,
        gradient_clip_val=spec.clip_val,
        gradient_clip_algorithm=spec.clip_algorithm,
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in extra_callbacks),
        callbacks=[recorder]
        + [c for c in (saved, autocast) if c is not None]
        + ([StepMarks(reductions)] if reductions else [])
        + ([host_reads] if host_reads else [])
        + summaries
        + extra_callbacks,
        use_distributed_sampler=spec.default_sampler,
        **trainer_options,
    )
    if build_on == "init_module":
        with trainer.init_module(empty_init=spec.empty_init):
            model = build()
    elif build_on == "meta":  # on the meta device in the Trainer's dtype; configure_model materializes it
        with torch.device("meta"), trainer.precision_plugin.tensor_init_context():
            model = build()
    data = OrderedData(
        spec.batch_size,
        spec.data_size,
        spec.variable_length,
        spec.tokens,
        shuffled=spec.default_sampler,
        dataset=spec.dataset,
    )
    collective_dtypes: Counter[tuple[str, str]] = Counter()  # (collective, dtype sent)
    collectives = count_fsdp_collectives(trainer.strategy, collective_dtypes) if spec.count_collectives else None
    if spec.tune is not None:  # the Tuner's method, run before fit
        getattr(Tuner(trainer), spec.tune)(model, datamodule=data)
    if host_reads is not None:
        host_reads.install()
    try:
        trainer.fit(model, datamodule=data)
    finally:
        if host_reads is not None:
            host_reads.remove()
    if spec.save_checkpoint:  # a name in out_dir; every rank takes part (under bfpp a sharded directory)
        trainer.save_checkpoint(Path(spec.out_dir) / spec.save_checkpoint)
    validated = trainer.validate(model, datamodule=data, verbose=False) if spec.validate_after else None
    result = {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "losses": recorder.losses,
        "logged": recorder.logged,
        "state": {k: full_tensor(v).detach().cpu().clone() for k, v in model.state_dict().items()},
        "validated": validated,
        "saved_bytes": saved.total if saved else None,
        "initial": recorder.initial,
        "allocated_before_setup": recorder.allocated_before_setup,
        "param_bytes": recorder.param_bytes,
        "batched_linears": recorder.batched_linears,
        "collectives": dict(collectives) if collectives is not None else None,
        "collective_dtypes": dict(collective_dtypes),
        "linear_dtypes": autocast.output_dtypes if autocast else None,
        "backward_autocast": autocast.backward_autocast if autocast else None,
        "reductions": reductions.events if reductions is not None else None,
        "summaries": {type(s).__name__: s.text for s in summaries},  # printed on rank 0 only
        "targets": recorder.targets,
        "host_reads": host_reads.steps if host_reads else None,
        "process_groups": len(dist.distributed_c10d._world.pg_map),  # every group this process holds, after fit
    }
    if spec.out_dir:
        torch.save(result, Path(spec.out_dir) / f"rank{trainer.global_rank}.pt")
    return result


def run_all(spec: TrainJobSpec) -> None:
    """Runs ``spec`` once per entry of its ``runs`` (``{"name": ..., **overrides}``; default: once as it is), each
    with a fresh module and Trainer, writing to ``out_dir/<name>``. A run with ``"expect_error": True`` writes the
    error message it raised to ``out_dir/<name>/rank<local rank>.error`` instead of failing the job."""
    if not spec.runs:
        run(spec)
    for overrides in spec.runs:
        name, expect_error = overrides["name"], overrides.get("expect_error", False)
        out_dir = Path(spec.out_dir or ".") / name
        out_dir.mkdir(parents=True, exist_ok=True)
        changes = {k: v for k, v in overrides.items() if k not in ("name", "expect_error")}
        try:
            run(spec.replaced(**changes, out_dir=str(out_dir)))
        except Exception as error:
            if not expect_error:
                raise
            (out_dir / f"rank{os.environ.get('LOCAL_RANK', '0')}.error").write_text(f"{type(error).__name__}: {error}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    run_all(TrainJobSpec.from_dict(json.loads(Path(sys.argv[1]).read_text())))
