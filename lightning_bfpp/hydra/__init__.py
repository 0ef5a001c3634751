"""Hydra support: structured configs, a Trainer built from the config, checks before launch, sweep-safe rank
restarts, ``ckpt_path=last`` and the printed resume command. An app keeps only its model and data::

    import hydra
    from lightning_bfpp.hydra import TrainConfig, register_configs, run

    register_configs(TrainConfig, model={"mine": MyModelConfig}, data={"mine": MyDataConfig})

    def build(cfg):
        return MyModel(**cfg.model), MyData(**cfg.data)  # optionally a third item: callbacks

    @hydra.main(version_base="1.3", config_path="conf", config_name="train")
    def main(cfg):
        return run(cfg, build)

The app's ``conf/train.yaml`` starts its defaults list with ``- train_schema`` and ``- override hydra/help: bfpp``;
see the example app (``examples/train.py`` and ``conf/``). Importing this module imports Hydra and Lightning;
``import lightning_bfpp`` does neither.
"""

from lightning_bfpp.config import BFPPStrategyConfig
from lightning_bfpp.hydra.app import Builder, run
from lightning_bfpp.hydra.checks import (
    ConfigError,
    check_config,
    check_hardware,
    check_pipeline,
    check_single_device,
)
from lightning_bfpp.hydra.resume import newest_checkpoint, resolve_ckpt_path, resume_command
from lightning_bfpp.hydra.schema import (
    CheckpointConfig,
    DDPStrategyConfig,
    SingleStrategyConfig,
    TrainConfig,
    TrainerConfig,
    register_configs,
)
from lightning_bfpp.hydra.trainer import build_strategy, build_trainer, resolve_trainer

__all__ = [
    "BFPPStrategyConfig",
    "Builder",
    "CheckpointConfig",
    "ConfigError",
    "DDPStrategyConfig",
    "SingleStrategyConfig",
    "TrainConfig",
    "TrainerConfig",
    "build_strategy",
    "build_trainer",
    "check_config",
    "check_hardware",
    "check_pipeline",
    "check_single_device",
    "newest_checkpoint",
    "register_configs",
    "resolve_ckpt_path",
    "resolve_trainer",
    "resume_command",
    "run",
]
