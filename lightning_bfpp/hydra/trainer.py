"""The Trainer of a Hydra app, built from the config: ``accelerator``, ``devices`` and ``precision`` chosen where the
config leaves them to us, the strategy instantiated and checked, Lightning's ``ModelCheckpoint`` and CSV logger."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate, to_absolute_path
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from lightning_bfpp.config import BFPPStrategyConfig
from lightning_bfpp.hydra.checks import ConfigError, check_hardware, is_single, on_gpu

log = logging.getLogger(__name__)


def resolve_trainer(cfg: DictConfig) -> dict[str, Any]:
    """The Trainer's arguments, with ``accelerator``, ``devices`` and ``precision`` chosen where the config leaves
    them to us (see :class:`~lightning_bfpp.hydra.TrainerConfig`); a GPU trainer without a GPU, or no devices, is
    refused."""
    check_hardware(cfg.trainer)
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(kwargs, dict)
    accelerator = kwargs["accelerator"]
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    gpu = on_gpu(accelerator)
    if kwargs["devices"] == "auto":
        bfpp = OmegaConf.get_type(cfg.strategy) is BFPPStrategyConfig
        pipeline = cfg.strategy.pipeline_parallel_size if bfpp else None
        if is_single(cfg):
            devices = 1
        elif gpu:
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
        if gpu:
            kwargs["precision"] = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        else:
            kwargs["precision"] = "32-true"
    return kwargs


def build_strategy(cfg: DictConfig) -> Any:
    """Instantiates ``cfg.strategy``; a value the strategy refuses ends in one line naming it."""
    try:
        return instantiate(cfg.strategy, _convert_="all")
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, (ValueError, TypeError)):
            raise ConfigError(f"strategy: {cause}") from cause
        raise


def checkpoint_callback(cfg: DictConfig, run_dir: Path) -> ModelCheckpoint:
    """Lightning's ``ModelCheckpoint`` as ``cfg.checkpoint`` says (``dir: null``: ``<run dir>/checkpoints``)."""
    return ModelCheckpoint(
        dirpath=checkpoint_dir(cfg, run_dir),
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint.every_n_train_steps,
        save_last=cfg.checkpoint.save_last,
        save_top_k=cfg.checkpoint.save_top_k,
    )


def checkpoint_dir(cfg: DictConfig, run_dir: Path) -> Path:
    return Path(to_absolute_path(cfg.checkpoint.dir)) if cfg.checkpoint.dir else run_dir / "checkpoints"


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    callbacks: Sequence[pl.Callback] = (),
    strategy: Any = None,
    trainer_kwargs: dict[str, Any] | None = None,
) -> tuple[pl.Trainer, ModelCheckpoint]:
    """The Trainer of ``cfg`` (its strategy and resolved arguments, if not given), writing logs and checkpoints
    under ``run_dir``; and its ``ModelCheckpoint``."""
    trainer_kwargs = resolve_trainer(cfg) if trainer_kwargs is None else trainer_kwargs
    strategy = build_strategy(cfg) if strategy is None else strategy
    checkpoint = checkpoint_callback(cfg, run_dir)
    trainer = pl.Trainer(
        **trainer_kwargs,
        strategy=strategy,
        callbacks=[checkpoint, *callbacks],
        logger=CSVLogger(run_dir, name="logs"),
        default_root_dir=run_dir,
    )
    return trainer, checkpoint
