"""Structured configs (dataclasses) for a Hydra training app: the job, the trainer, the checkpoints, the strategies.

:func:`register_configs` stores them in Hydra's ConfigStore, with the app's own model and data schemas, so that the
YAML files of the app's ``conf/`` name them first in their defaults lists (``- train_schema``,
``- /schema/strategy/bfpp@strategy``) and Hydra checks every key and type while it composes the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from lightning_bfpp.config import BFPPStrategyConfig
from lightning_bfpp.hydra.help import HELP_NAME, help_config


@dataclass
class SingleStrategyConfig:
    """One process on one device (Lightning's ``strategy="auto"``, ``devices=1``): the reference to compare with."""

    _target_: str = "lightning_bfpp.hydra.strategies.single_device"


@dataclass
class DDPStrategyConfig:
    """Lightning's ``DDPStrategy``: every process holds the whole model."""

    _target_: str = "lightning_bfpp.hydra.strategies.ddp"
    process_group_backend: str | None = None
    find_unused_parameters: bool = False
    timeout: float = 1800.0  # seconds


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.pytorch.Trainer``.

    ``devices: auto`` picks, on CPU, one process per pipeline rank (``P`` processes with ``strategy=bfpp``, 2 with
    ``ddp``, 1 with ``single``) and, on GPU, every visible GPU. ``precision: null`` picks ``32-true`` on CPU and
    ``bf16-mixed`` on GPU.
    """

    accelerator: str = "auto"
    devices: Any = "auto"  # an int, a list of device indices, or "auto"
    num_nodes: int = 1
    precision: str | None = None
    max_steps: int = 300
    max_epochs: int | None = None
    max_time: str | None = None  # "DD:HH:MM:SS"
    val_check_interval: Any = 100  # an int: every so many training batches; a float: a fraction of an epoch
    check_val_every_n_epoch: int | None = None  # None: val_check_interval counts batches across epochs
    limit_train_batches: Any = None
    limit_val_batches: Any = 20
    num_sanity_val_steps: int = 1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    gradient_clip_algorithm: str = "norm"
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    enable_model_summary: bool = True


@dataclass
class CheckpointConfig:
    """Lightning's ``ModelCheckpoint``. ``dir: null`` writes to ``<run dir>/checkpoints``."""

    dir: str | None = None
    every_n_train_steps: int = 100
    save_last: bool = True
    save_top_k: int = 1


@dataclass
class TrainConfig:
    """The top level of a training app's config; an app adds its own keys in a subclass (e.g. ``optim``)."""

    name: str = MISSING
    seed: int = 1234
    ckpt_path: str | None = None  # a .ckpt file, or "last": the newest complete checkpoint of runs next to this one
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: Any = MISSING  # strategy=bfpp: lightning_bfpp.config.BFPPStrategyConfig, set by the groups too
    model: Any = MISSING
    data: Any = MISSING
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


STRATEGIES: dict[str, type] = {"bfpp": BFPPStrategyConfig, "ddp": DDPStrategyConfig, "single": SingleStrategyConfig}


def register_configs(schema: type = TrainConfig, **groups: dict[str, type]) -> None:
    """Stores ``schema`` as ``train_schema``, the strategies as ``schema/strategy/{bfpp,ddp,single}``, each
    ``groups[<group>][<name>]`` as ``schema/<group>/<name>`` (e.g. ``model={"gpt": GPTConfig}``), and the app's
    help page as ``hydra/help: bfpp`` (``- override hydra/help: bfpp`` in the defaults list uses it)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=schema)
    for group, schemas in {"strategy": STRATEGIES, **groups}.items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
    cs.store(group="hydra/help", name=HELP_NAME, node=help_config())
