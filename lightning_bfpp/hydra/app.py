"""The training run of a Hydra app: check the config, build the trainer, fit, report.

Multi-process runs: Lightning's script launcher starts local ranks 1.. by re-running ``sys.argv`` with
``hydra.run.dir=<this run's dir>`` (``_hydra_subprocess_cmd``), so every rank writes into the same run directory.
Under ``-m`` (multirun) that command line would start the whole sweep again in every child, so :func:`run` rewrites
``sys.argv`` to the current job's own overrides first; jobs of a sweep run one after the other.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, open_dict, read_write

from lightning_bfpp.hydra.checks import ConfigError, check_config, check_pipeline, check_single_device
from lightning_bfpp.hydra.resume import resolve_ckpt_path, resume_command
from lightning_bfpp.hydra.trainer import build_strategy, build_trainer, checkpoint_dir, resolve_trainer
from lightning_bfpp.run.host_sync import host_values

log = logging.getLogger(__name__)

Built = tuple[pl.LightningModule, pl.LightningDataModule] | tuple[pl.LightningModule, pl.LightningDataModule, Any]
Builder = Callable[[DictConfig], Built]
"""What an app builds from the config: the module, the data module and, optionally, a callback or a list of them."""

_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_LAYOUT_KEYS = ("pipeline_parallel_size", "stages_per_rank", "micro_batches", "schedule", "partition", "sharding")
_CONFIG_FLAGS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")

# A resumed run writes its checkpoints into its own run directory: Lightning's note that the old directory's best-k
# bookkeeping is not carried over says nothing the user needs to act on.
warnings.filterwarnings("ignore", message="The dirpath has changed from")
# Lightning 2.6 with a newer torch warns about its own use of a torch API on every rank: nothing to do for the user.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


@rank_zero_only
def info(message: str) -> None:
    log.info(message)


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


def _built(cfg: DictConfig, build: Builder) -> tuple[pl.LightningModule, pl.LightningDataModule, list[pl.Callback]]:
    try:
        model, data, *rest = build(cfg)
    except ValueError as error:  # a model or data value the app's classes refuse: one line naming it
        raise ConfigError(str(error)) from error
    callbacks = rest[0] if rest else []
    return model, data, list(callbacks) if isinstance(callbacks, Sequence) else [callbacks]


def _layout(strategy: Any) -> str:
    options = getattr(strategy, "options", None)
    return "" if options is None else ", ".join(f"{k}={getattr(options, k)}" for k in _LAYOUT_KEYS)


def run(cfg: DictConfig, build: Builder) -> dict[str, float]:
    """Trains what ``build(cfg)`` returns as ``cfg`` says; returns the final metrics (for sweepers).

    Before any process starts: the config's keys, the hardware, the strategy's options and the pipeline layout
    against the model and ``data.batch_size`` are checked, each failing in one line. ``ckpt_path=last`` resumes
    from the newest complete checkpoint of the runs next to this one; at the end the command that resumes this run
    is printed.
    """
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
    model, data, callbacks = _built(cfg, build)
    check_pipeline(cfg, strategy, model, trainer_kwargs)

    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir, checkpoint_dir(cfg, run_dir), sweep=sweep)
    trainer, checkpoint = build_trainer(cfg, run_dir, callbacks, strategy, trainer_kwargs)
    layout = _layout(strategy)
    parameters = sum(p.numel() for p in model.parameters())
    info(f"{type(model).__name__} with {parameters / 1e6:.2f} M parameters on {getattr(data, 'description', data)}")
    info(
        f"strategy={hydra_cfg.runtime.choices.get('strategy')}{f' ({layout})' if layout else ''} | "
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

    metrics = {k: host_values(v.reshape(())) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    last = checkpoint.last_model_path or checkpoint.best_model_path
    if last:
        info(f"checkpoint: {last}")
        shown = os.path.relpath(last) if not os.path.relpath(last).startswith("..") else last
        info(f"resume with: {resume_command(hydra_cfg, shown, 2 * trainer.global_step)}")
    _end_job(trainer, env_before)
    return metrics
