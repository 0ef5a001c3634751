"""The training run shared by the example Hydra apps: check the config, build the trainer, fit, report.

Multi-process runs: Lightning's script launcher starts local ranks 1.. by re-running ``sys.argv`` with
``hydra.run.dir=<this run's dir>`` (``_hydra_subprocess_cmd``), so every rank writes into the same run directory.
Under ``-m`` (multirun) that command line would start the whole sweep again in every child, so :func:`run` rewrites
``sys.argv`` to the current job's own overrides first; jobs of a sweep run one after the other.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from hydra.utils import instantiate, to_absolute_path
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from bfpp_examples.config import SingleStrategyConfig
from lightning_bfpp import BFPPStrategy
from lightning_bfpp.config import BFPPStrategyConfig
from lightning_bfpp.plan.partition import build_partition
from lightning_bfpp.plan.schedule import build_schedule
from lightning_bfpp.run.checkpoint import is_incomplete_checkpoint
from lightning_bfpp.run.microbatch import check_divisible

log = logging.getLogger(__name__)

# What a task builds from the config: the module, the data module, and a callback that reports throughput.
Builder = Callable[[DictConfig], tuple[pl.LightningModule, pl.LightningDataModule, pl.Callback]]

_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_LAYOUT_KEYS = ("pipeline_parallel_size", "stages_per_rank", "micro_batches", "schedule", "partition", "sharding")
_CONFIG_FLAGS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")


# A resumed run writes its checkpoints into its own run directory: Lightning's note that the old directory's best-k
# bookkeeping is not carried over says nothing the user needs to act on.
warnings.filterwarnings("ignore", message="The dirpath has changed from")
# Lightning 2.6 with a newer torch warns about its own use of a torch API on every rank: nothing to do for the user.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


class ConfigError(CompactHydraException, ValueError):
    """A config key or value that cannot be used; the message names it (Hydra prints it without a traceback)."""


@rank_zero_only
def info(message: str) -> None:
    log.info(message)


# --------------------------------------------------------------------------------------------- config checking
def check_config(cfg: DictConfig) -> None:
    """Fails with a message naming the key when a key is unknown (also one added with ``+key=value``), a mandatory
    value is missing (``???``) or a value cannot be resolved to its declared type."""
    unknown = list(_unknown_keys(cfg, ""))
    if unknown:
        key, schema, allowed = unknown[0]
        raise ConfigError(
            f"Unknown config key '{key}': {schema.__name__} has no field of that name; its fields are "
            f"{', '.join(sorted(allowed))}."
        )
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"Missing mandatory config value(s) {', '.join(missing)}: set them on the command line, "
            f"e.g. {missing[0]}=..."
        )
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # raises naming the key (full_key: ...)


def _unknown_keys(node: DictConfig, prefix: str) -> Iterator[tuple[str, type, set[str]]]:
    schema = OmegaConf.get_type(node)
    allowed = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node:
        if allowed is not None and key not in allowed:
            yield f"{prefix}{key}", schema, allowed
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            yield from _unknown_keys(child, f"{prefix}{key}.")


def check_single_device(cfg: DictConfig) -> None:
    """Fails before any process starts when ``strategy=single`` (one process) is given several devices."""
    if OmegaConf.get_type(cfg.strategy) is SingleStrategyConfig and str(cfg.trainer.devices) not in ("auto", "1"):
        raise ConfigError(
            f"strategy=single runs one process, but trainer.devices={cfg.trainer.devices}: drop trainer.devices, or "
            "use strategy=bfpp or strategy=ddp for several processes."
        )


# ------------------------------------------------------------------------------------------- trainer and strategy
def resolve_trainer(cfg: DictConfig) -> dict[str, Any]:
    """The Trainer's arguments, with ``accelerator``, ``devices`` and ``precision`` chosen where the config leaves
    them to us (see :class:`~bfpp_examples.config.TrainerConfig`)."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(kwargs, dict)
    schema = OmegaConf.get_type(cfg.strategy)
    accelerator = kwargs["accelerator"]
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    on_gpu = accelerator in ("gpu", "cuda")
    if kwargs["devices"] == "auto":
        pipeline = cfg.strategy.pipeline_parallel_size if schema is BFPPStrategyConfig else None
        if schema is SingleStrategyConfig:
            devices = 1
        elif on_gpu:
            devices = torch.cuda.device_count()
            if isinstance(pipeline, int) and devices % pipeline:
                fitted = math.gcd(devices, pipeline)
                log.warning(
                    f"strategy.pipeline_parallel_size={pipeline} does not divide the {devices} GPU(s): using "
                    f"{fitted}. Set trainer.devices to keep {pipeline}."
                )
                cfg.strategy.pipeline_parallel_size = fitted
        else:  # Lightning's "auto" is one CPU process: a pipeline needs one process per pipeline rank
            devices = pipeline if isinstance(pipeline, int) else 2
        kwargs["devices"] = devices
    kwargs["accelerator"] = accelerator
    if kwargs["precision"] is None:
        if on_gpu:
            kwargs["precision"] = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        else:
            kwargs["precision"] = "32-true"
    return kwargs


def build_strategy(cfg: DictConfig) -> Any:
    """Instantiates ``cfg.strategy``; the strategy's options check the values and name the bad one."""
    return instantiate(cfg.strategy, _convert_="all")


def check_pipeline(cfg: DictConfig, strategy: Any, model: pl.LightningModule, trainer_kwargs: dict[str, Any]) -> None:
    """Checks the pipeline layout against the model and the batch size before any process starts (the strategy
    checks again on every rank), so that a layout that cannot work fails once, with one message."""
    if not isinstance(strategy, BFPPStrategy):
        return
    s = strategy.options
    world = _count_devices(trainer_kwargs["devices"], trainer_kwargs["accelerator"]) * trainer_kwargs["num_nodes"]
    pipeline = world if s.pipeline_parallel_size == "auto" else s.pipeline_parallel_size
    micro_batches = s.micro_batches or pipeline
    if world % pipeline:
        raise ConfigError(
            f"strategy.pipeline_parallel_size={pipeline} does not divide the {world} processes (trainer.devices x "
            "trainer.num_nodes): change one of them."
        )
    batch_size = cfg.data.get("batch_size")
    if batch_size is not None:
        try:
            check_divisible(batch_size, micro_batches)
        except ValueError as error:
            raise ConfigError(f"data.batch_size={batch_size}: {error}") from error
    try:
        layers = list(model.pipeline_layers())
        build_partition(layers, pipeline, s.stages_per_rank, s.partition, s.partition_boundaries)
        groups = s.breadth_first_micro_batches  # M checked against its groups once M is known (P = "auto")
        build_schedule(s.schedule, pipeline, s.stages_per_rank, micro_batches, breadth_first_micro_batches=groups)
    except ValueError as error:
        raise ConfigError(f"The pipeline layout does not fit (strategy.*): {error}") from error


def _count_devices(devices: Any, accelerator: str) -> int:
    """The number of processes per node that Lightning makes of ``trainer.devices`` (an int, a list or a string)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1"):
        return torch.cuda.device_count() if accelerator in ("gpu", "cuda") else 1
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    return int(text)


def resolve_ckpt_path(value: str | None, run_dir: Path, checkpoint_dir: Path, sweep: bool = False) -> str | None:
    """``None``, a checkpoint file, or ``"last"``: the newest ``last.ckpt`` among the runs next to this one
    (``<run dir>/../*/checkpoints/``) and in ``checkpoint_dir``; in a sweep (``-m``), this job's own ``last.ckpt``
    only (e.g. of a resubmitted SLURM job)."""
    if value is None:
        return None
    if value == "last":
        siblings = [] if sweep else list(run_dir.parent.glob("*/checkpoints/last.ckpt"))
        candidates = [*siblings, checkpoint_dir / "last.ckpt"]
        # a file, or a directory for sharded checkpoints (one whose save did not finish is skipped)
        found = [p for p in candidates if p.exists() and not is_incomplete_checkpoint(p)]
        if not found:
            where = checkpoint_dir if sweep else f"{run_dir.parent}/*/checkpoints/"
            log.warning(f"ckpt_path=last: no last.ckpt in {where}: training from scratch.")
            return None
        return str(max(found, key=lambda p: p.stat().st_mtime))
    path = Path(to_absolute_path(value))
    if not path.exists():
        raise ConfigError(f"ckpt_path={value!r}: {path} does not exist (give a .ckpt file, or ckpt_path=last).")
    return str(path)


# ------------------------------------------------------------------------------------------ Hydra and launching
def _single_job_argv(hydra_cfg: DictConfig) -> None:
    """Under multirun, makes the command line that Lightning re-runs for local ranks 1.. start this job only, in
    this job's directory (Lightning adds ``hydra.run.dir=<hydra.run.dir>``: set that to the job's directory)."""
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    keep, args = [], sys.argv[1:]
    for i, arg in enumerate(args):  # keep --config-name/--config-path/--config-dir and their values
        if arg.split("=", 1)[0] in _CONFIG_FLAGS:
            keep.append(arg)
            if "=" not in arg and i + 1 < len(args):
                keep.append(args[i + 1])
    sys.argv = [sys.argv[0], *keep, *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def _end_job(trainer: pl.Trainer, env_before: dict[str, str | None]) -> None:
    """Lets the next job of a sweep start clean: waits for this job's child processes, closes the process group and
    removes the variables the launcher set (with LOCAL_RANK set, Lightning would not start processes again)."""
    launcher = trainer.strategy.launcher
    for proc in getattr(launcher, "procs", []):
        proc.wait(timeout=120)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in env_before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _resume_command(hydra_cfg: DictConfig, ckpt: str, max_steps: int) -> str:
    script = os.path.relpath(to_absolute_path(sys.argv[0]))
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith(("ckpt_path=", "trainer.max_steps="))]
    return " ".join(["python", script, *overrides, f"ckpt_path={ckpt}", f"trainer.max_steps={max_steps}"])


# ---------------------------------------------------------------------------------------------------- the run
def run(cfg: DictConfig, build: Builder) -> dict[str, float]:
    """Trains what ``build(cfg)`` returns as ``cfg`` says; returns the final metrics (for sweepers)."""
    check_config(cfg)
    check_single_device(cfg)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    env_before = {key: os.environ.get(key) for key in _LAUNCHER_ENV}
    _single_job_argv(hydra_cfg)

    trainer_kwargs = resolve_trainer(cfg)
    strategy = build_strategy(cfg)
    if trainer_kwargs["accelerator"] != "cpu":
        torch.set_float32_matmul_precision("high")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model, data, throughput = build(cfg)
    check_pipeline(cfg, strategy, model, trainer_kwargs)

    checkpoint_dir = Path(to_absolute_path(cfg.checkpoint.dir)) if cfg.checkpoint.dir else run_dir / "checkpoints"
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir, checkpoint_dir, sweep=hydra_cfg.mode == RunMode.MULTIRUN)
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir,
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint.every_n_train_steps,
        save_last=cfg.checkpoint.save_last,
        save_top_k=cfg.checkpoint.save_top_k,
    )
    trainer = pl.Trainer(
        **trainer_kwargs,
        strategy=strategy,
        callbacks=[checkpoint, throughput],
        logger=CSVLogger(run_dir, name="logs"),
        default_root_dir=run_dir,
    )
    layout = ", ".join(f"{k}={cfg.strategy[k]}" for k in _LAYOUT_KEYS if k in cfg.strategy)
    parameters = sum(p.numel() for p in model.parameters())
    info(f"{type(model).__name__} with {parameters / 1e6:.2f} M parameters on {data.description}")
    info(
        f"strategy={hydra_cfg.runtime.choices.strategy}{f' ({layout})' if layout else ''} | "
        f"{trainer_kwargs['accelerator']} x {trainer_kwargs['devices']} | precision {trainer_kwargs['precision']}"
    )
    info(f"run directory: {run_dir}")
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is not None:  # who starts the processes and gives the ranks (SLURMEnvironment under srun)
        name = type(environment).__name__
        info(f"{trainer.world_size} processes on {trainer.num_nodes} node(s), cluster environment {name}")
    if ckpt_path:
        info(f"resuming from {ckpt_path}")

    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    last = checkpoint.last_model_path or checkpoint.best_model_path
    if last:
        info(f"checkpoint: {last}")
        shown = os.path.relpath(last) if not os.path.relpath(last).startswith("..") else last
        info(f"resume with: {_resume_command(hydra_cfg, shown, 2 * trainer.global_step)}")
    _end_job(trainer, env_before)
    return metrics
