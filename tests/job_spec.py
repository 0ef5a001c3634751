"""Typed configurations of the test jobs (``run_job.py``, ``fault_job.py``, ``eval_job.py``, ``runtime_job.py``).

A test gives a spec or a plain dict; :meth:`JobSpec.from_dict` turns the dict into the spec and raises ``TypeError``
naming any key the spec does not have, so a typo in a test's config fails instead of being ignored. The job scripts
read the spec back from JSON (:meth:`JobSpec.to_dict`) and use attribute access only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from typing_extensions import Self


class JobSpec:
    """Base of the frozen spec dataclasses: conversion from and to plain dicts (JSON)."""

    nested: ClassVar[dict[str, type[JobSpec]]] = {}  # fields holding specs (a tuple of them if the value is a list)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | Self) -> Self:
        """The spec of ``values``; a spec is returned as it is. Unknown keys raise ``TypeError`` naming them."""
        if isinstance(values, cls):
            return values
        check_keys(cls, values)
        converted = {}
        for key, value in values.items():
            spec_class = cls.nested.get(key)
            if spec_class is not None and isinstance(value, list | tuple):
                value = tuple(spec_class.from_dict(v) for v in value)
            elif spec_class is not None:
                value = spec_class.from_dict(value)
            converted[key] = value
        return cls(**converted)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def replaced(self, **changes: Any) -> Self:
        """A copy with ``changes`` (checked like :meth:`from_dict`)."""
        check_keys(type(self), changes)
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def check_keys(spec_class: type, values: Mapping[str, Any], allowed: tuple[str, ...] = ()) -> None:
    """Raises ``TypeError`` naming the keys of ``values`` that are not fields of ``spec_class`` (nor ``allowed``)."""
    known = {f.name for f in dataclasses.fields(spec_class)} | set(allowed)
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"{spec_class.__name__} has no key {', '.join(map(repr, unknown))}; known: {sorted(known)}")


@dataclass(frozen=True)
class TrainJobSpec(JobSpec):
    """One training run of ``run_job.py`` (on ``devices`` processes, Lightning starting the ranks)."""

    batch_size: int  # per data-parallel replica
    devices: int = 1  # processes (Trainer ``devices``)
    out_dir: str | None = None  # each rank writes rank<global rank>.pt here (the run_job fixture sets it)
    seed: int = 1  # seed_everything
    model_class: str = "StackModel"  # a class of models.py, or "module:factory"
    model: dict[str, Any] = field(default_factory=dict)  # its keyword arguments
    build_on: str | None = None  # None; "init_module" (trainer.init_module); "meta" (configure_model materializes)
    empty_init: bool = True  # init_module's empty_init
    strategy: dict[str, Any] | str | None = None  # BFPPStrategy keyword arguments; a name; None: "auto"
    pg_timeout: float = 60  # process-group timeout, seconds
    emulate_nccl_streams: str | None = None  # "rank": NCCL's transfer order on the group's one stream, over gloo
    timeline_dir: str | None = None  # the strategy records its executed timeline there
    precision: str = "64-true"  # Trainer precision; "16-mixed" as the CPU mixed-precision plugin
    scaler: dict[str, Any] = field(default_factory=dict)  # GradScaler keyword arguments (16-mixed)
    accumulate: int = 1  # accumulate_grad_batches
    clip_val: float | None = None  # gradient_clip_val
    clip_algorithm: str = "norm"  # gradient_clip_algorithm
    max_steps: int = 3
    trainer: dict[str, Any] = field(default_factory=dict)  # further Trainer arguments (fast_dev_run, max_epochs...)
    callbacks: list[str] = field(default_factory=list)  # Lightning callbacks by class name (run_job.stock_callbacks)
    csv_logger: bool = False  # a CSVLogger in out_dir
    summary: bool = False  # keep what ModelSummary and RichModelSummary print
    data_size: int = 96  # samples in the data set
    variable_length: bool = False  # sequence batches whose length changes every step
    tokens: dict[str, int] | None = None  # {"seq_len": ..., "vocab": ...}: language-model samples
    dataset: str | None = None  # "module:function" making the data set from its size
    default_sampler: bool = False  # a shuffling loader and Lightning's DistributedSampler
    validate_after: bool = False  # validation batches during fit, and trainer.validate after it
    save_checkpoint: str | None = None  # trainer.save_checkpoint to this name in out_dir after fit
    tune: str | None = None  # "lr_find" or "scale_batch_size": the Tuner's method, run before fit
    record_initial: bool = False  # keep the weights before the first step and this rank's parameter bytes
    count_saved_bytes: bool = False  # add up what autograd saves for backward in the training steps
    record_autocast: bool = False  # record Linear output dtypes and autocast in backward
    record_reductions: bool = False  # log gradient reductions and step marks
    count_collectives: bool = False  # count FSDP collectives and their dtypes
    count_host_reads: bool = False  # count the package's reads of tensor values on the host, per training batch
    rank_overrides: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # local rank -> key -> merged
    runs: list[dict[str, Any]] = field(default_factory=list)  # {"name", "expect_error"?, **overrides}: one run each

    def __post_init__(self) -> None:
        for run in self.runs:
            check_keys(TrainJobSpec, run, allowed=("name", "expect_error"))
        for overrides in self.rank_overrides.values():
            check_keys(TrainJobSpec, overrides)

    def for_rank(self, local_rank: str) -> TrainJobSpec:
        """This spec with ``rank_overrides[local_rank]`` merged into its dict-valued fields."""
        overrides = self.rank_overrides.get(local_rank, {})
        return self.replaced(**{k: {**(getattr(self, k) or {}), **v} for k, v in overrides.items()})


@dataclass(frozen=True)
class FaultJobSpec(JobSpec):
    """One training run of ``fault_job.py`` (one process per rank, started by the test), with injected faults."""

    batch_size: int  # per data-parallel replica
    devices: int = 1  # processes
    out_dir: str | None = None  # each rank writes rank<global rank>.pt here
    seed: int = 1  # seed_everything
    model: dict[str, Any] = field(default_factory=dict)  # StackModel keyword arguments
    strategy: dict[str, Any] | None = None  # BFPPStrategy keyword arguments; None: one process
    pg_timeout: float = 30  # process-group timeout, seconds
    precision: str = "64-true"  # as in TrainJobSpec
    scaler: dict[str, Any] = field(default_factory=dict)  # as in TrainJobSpec
    clip_val: float | None = None  # gradient_clip_val
    max_steps: int = 4
    data_size: int = 96  # samples in the data set
    faults: dict[str, Any] = field(default_factory=dict)  # what to break where (fault_job's docstring)
    checkpoint_dir: str | None = None  # save last.ckpt there after every step
    ckpt_path: str | None = None  # resume from it ("last" too)


@dataclass(frozen=True)
class EvalDataSpec(JobSpec):
    """Sizes and batch sizes of ``eval_job.py``'s data sets."""

    train_size: int = 32
    batch_size: int = 8  # global training batch (split over the replicas)
    val_size: int = 26
    val_batch_size: int = 6  # validation and test
    test_size: int = 20
    predict_size: int = 20
    predict_batch_size: int = 4


@dataclass(frozen=True)
class StageSpec(JobSpec):
    """One stage of ``eval_job.py``: a fresh module and Trainer running ``actions``."""

    name: str  # the result file's prefix
    strategy: dict[str, Any] | None = None  # BFPPStrategy keyword arguments; None: one process
    model: dict[str, Any] = field(default_factory=dict)  # MetricModel keyword arguments
    trainer: dict[str, Any] = field(default_factory=dict)  # further Trainer arguments
    callbacks: list[str] = field(default_factory=list)  # "checkpoint", "early_stopping", "lr_monitor"
    loggers: list[str] = field(default_factory=list)  # "csv", "tensorboard"
    progress_bar: str | None = None  # "tqdm", "rich" or None
    checkpoint_dir: str = "checkpoints"  # ModelCheckpoint's folder in root_dir
    actions: list[list[Any]] = field(default_factory=lambda: [["fit", None]])  # [kind, ckpt or path] in order


@dataclass(frozen=True)
class EvalJobSpec(JobSpec):
    """A sequence of Lightning stages run by ``eval_job.py`` (one process per rank under Lightning)."""

    nested: ClassVar[dict[str, type[JobSpec]]] = {"data": EvalDataSpec, "stages": StageSpec}

    root_dir: str  # checkpoints, logs; the actions' paths are relative to it
    stages: tuple[StageSpec, ...]
    devices: int = 1  # processes
    out_dir: str | None = None  # each rank writes <stage>.rank<global rank>.pt here
    seed: int = 1  # seed_everything
    pg_timeout: float = 60  # process-group timeout, seconds
    data: EvalDataSpec = field(default_factory=EvalDataSpec)


@dataclass(frozen=True)
class RuntimeJobSpec(JobSpec):
    """``runtime_job.py``: layouts trained in turn by the runtime in a plain torch loop (no Lightning)."""

    out_dir: str  # each rank writes rank<r>.pt here
    layouts: dict[str, dict[str, Any]]  # name -> PipelineOptions values
    steps: int = 3  # optimizer steps per layout
    batch_size: int = 8  # per data-parallel replica
    pg_timeout: float = 30  # seconds, the process groups' timeout


JOB_SPECS: dict[str, type[JobSpec]] = {
    "run_job.py": TrainJobSpec,
    "fault_job.py": FaultJobSpec,
    "eval_job.py": EvalJobSpec,
    "runtime_job.py": RuntimeJobSpec,
}


def spec_for(script: str, config: JobSpec | Mapping[str, Any]) -> JobSpec:
    """The spec of the job ``script`` (a file name) from ``config``; a spec is returned as it is."""
    if isinstance(config, JobSpec):
        return config
    if script not in JOB_SPECS:
        raise TypeError(f"{script} reads no job spec; known jobs: {sorted(JOB_SPECS)}")
    return JOB_SPECS[script].from_dict(config)
