"""The second example: a residual convolutional network (not a transformer) on generated images of shapes.

    python examples/train_convnet.py                             # CPU: 2 processes, P=2 x L=2 looped stages, M=4
    python examples/train_convnet.py strategy=single             # the same model on one process, for comparison

The configuration is ``conf/train_convnet.yaml`` with the same groups as the main job.
"""

from __future__ import annotations

import hydra
from bfpp_examples.callbacks import Throughput
from bfpp_examples.config import register_configs
from bfpp_examples.convnet import ConvNet, ShapesDataModule
from omegaconf import DictConfig, OmegaConf

from lightning_bfpp.hydra import run

register_configs()


def build(cfg: DictConfig) -> tuple[ConvNet, ShapesDataModule, Throughput]:
    data = ShapesDataModule(**OmegaConf.to_container(cfg.data), seed=cfg.seed)
    model = ConvNet(
        num_classes=data.num_classes, **OmegaConf.to_container(cfg.model), optim=OmegaConf.to_container(cfg.optim)
    )
    return model, data, Throughput(units_per_sample=1, unit="samples", interval=cfg.log_interval)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_convnet")
def main(cfg: DictConfig) -> dict[str, float]:
    return run(cfg, build)


if __name__ == "__main__":
    main()
