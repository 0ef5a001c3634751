"""The main job: a GPT-style byte-level language model trained with breadth-first pipeline parallelism.

    python examples/train.py                                     # CPU: 2 processes, P=2 x L=2 looped stages, M=4
    python examples/train.py data.path=/my/texts                 # your own text files (or a .npy/.bin of token ids)
    python examples/train.py schedule=depth_first trainer.max_steps=100
    python examples/train.py -m strategy=bfpp,ddp trainer.max_steps=50
    python examples/train.py model=litgpt model.name=pythia-14m     # LitGPT's GPT (the litgpt extra)

The configuration lives in ``conf/`` (``conf/train.yaml`` and its groups); see ``docs/guide/hydra.md``.
"""

from __future__ import annotations

import hydra
from bfpp_examples.callbacks import Throughput
from bfpp_examples.config import LitGPTModelConfig, register_configs
from bfpp_examples.gpt import GPT
from bfpp_examples.text_data import TextDataModule
from omegaconf import DictConfig, OmegaConf

from lightning_bfpp import PipelineModule
from lightning_bfpp.hydra import run

register_configs()


def build(cfg: DictConfig) -> tuple[PipelineModule, TextDataModule, Throughput]:
    data = TextDataModule(**OmegaConf.to_container(cfg.data), seed=cfg.seed)
    if OmegaConf.get_type(cfg.model) is LitGPTModelConfig:
        from bfpp_examples.litgpt_model import build_litgpt  # imports litgpt, an optional extra

        model: PipelineModule = build_litgpt(cfg, data.vocab_size)
    else:
        model = GPT(
            vocab_size=data.vocab_size,
            seq_len=cfg.data.seq_len,
            **OmegaConf.to_container(cfg.model),
            optim=OmegaConf.to_container(cfg.optim),
        )
    return model, data, Throughput(units_per_sample=cfg.data.seq_len, unit="tokens", interval=cfg.log_interval)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> dict[str, float]:
    return run(cfg, build)


if __name__ == "__main__":
    main()
