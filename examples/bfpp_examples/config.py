"""Structured configs (dataclasses) behind ``conf/``: they fix the keys and types of every config group.

Hydra merges each YAML file of ``conf/`` onto one of these dataclasses, so a misspelt key or a value of the wrong
type fails while the config is composed, with a message naming the key (``full_key: strategy.stages_per_rank``).
The strategy's values (choices, sizes, options that exclude each other) are checked by the library
(``lightning_bfpp.options.PipelineOptions``) when the strategy is instantiated, before any process starts.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from lightning_bfpp.config import BFPPStrategyConfig

# ------------------------------------------------------------------------------------------------------- strategy


@dataclass
class SingleStrategyConfig:
    """One process on one device (Lightning's ``strategy="auto"``, ``devices=1``): the reference to compare with."""

    _target_: str = "bfpp_examples.strategies.single_device"


@dataclass
class DDPStrategyConfig:
    """Lightning's ``DDPStrategy``: every process holds the whole model."""

    _target_: str = "bfpp_examples.strategies.ddp"
    process_group_backend: str | None = None
    find_unused_parameters: bool = False
    timeout: float = 1800.0  # seconds


# -------------------------------------------------------------------------------------------------------- trainer


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
class OptimConfig:
    """AdamW with a linear warm-up and a cosine decay to ``min_lr_ratio * lr`` at ``trainer.max_steps``."""

    lr: float = 2e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1


@dataclass
class CheckpointConfig:
    """Lightning's ``ModelCheckpoint``. ``dir: null`` writes to ``<run dir>/checkpoints``."""

    dir: str | None = None
    every_n_train_steps: int = 100
    save_last: bool = True
    save_top_k: int = 1


# ------------------------------------------------------------------------------------------------ models and data


@dataclass
class GPTConfig:
    """A GPT-style decoder; its context length is ``data.seq_len`` and its vocabulary that of the data."""

    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True


@dataclass
class LitGPTModelConfig:
    """LitGPT's GPT of config ``name`` (``lightning_bfpp.adapters.litgpt``): random weights with the data's
    vocabulary and ``data.seq_len`` as its context, the shape keys overriding the config's; or, with ``checkpoint``
    (a LitGPT checkpoint directory), that model and its weights."""

    name: str = "pythia-14m"
    checkpoint: str | None = None
    tie_embeddings: bool = False
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    n_query_groups: int | None = None
    head_size: int | None = None
    intermediate_size: int | None = None


@dataclass
class TextDataConfig:
    """Language-model data: random windows of ``seq_len + 1`` tokens.

    ``path: null`` reads the bytes of the Python standard library's ``.py`` files (no download). A directory or a
    text file is read as bytes (vocabulary 256); a ``.npy`` or ``.bin`` file holds token ids (``dtype`` for ``.bin``,
    ``vocab_size: null`` = largest id + 1).
    """

    path: str | None = None
    glob: str | None = None  # files of a directory to read, e.g. "**/*.txt"; null: every non-hidden text file
    seq_len: int = 128
    batch_size: int = 16  # per data-parallel replica
    val_fraction: float = 0.05
    max_tokens: int | None = None  # read at most this many tokens (bytes), e.g. for a quick test
    dtype: str = "uint16"
    vocab_size: int | None = None
    num_workers: int = 0


@dataclass
class ConvNetConfig:
    """A residual convolutional network: stem, ``num_blocks`` residual blocks (downsampling at ``downsample_at``),
    pooled linear head."""

    channels: int = 32
    num_blocks: int = 6
    downsample_at: list[int] = field(default_factory=lambda: [2, 4])
    groups: int = 8  # GroupNorm groups (batch statistics would differ between micro-batches)


@dataclass
class ShapesDataConfig:
    """Generated images of noisy shapes (disk, square, ring, cross, diamond, bar): classify the shape."""

    image_size: int = 24
    train_size: int = 8192
    val_size: int = 1024
    noise: float = 0.35
    batch_size: int = 32  # per data-parallel replica
    num_workers: int = 0


# ------------------------------------------------------------------------------------------------- the whole job


@dataclass
class TrainConfig:
    """The top level of ``conf/train.yaml`` and ``conf/train_convnet.yaml``."""

    name: str = MISSING
    seed: int = 1234
    ckpt_path: str | None = None  # a .ckpt file, or "last": the newest last.ckpt of runs next to this one
    log_interval: int = 10  # print loss and throughput every so many optimizer steps
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: Any = MISSING  # strategy=bfpp: lightning_bfpp.config.BFPPStrategyConfig, set by the groups too
    model: Any = MISSING
    data: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


SCHEMAS: dict[str, dict[str, type]] = {
    "strategy": {"bfpp": BFPPStrategyConfig, "ddp": DDPStrategyConfig, "single": SingleStrategyConfig},
    "model": {"gpt": GPTConfig, "litgpt": LitGPTModelConfig, "convnet": ConvNetConfig},
    "data": {"text": TextDataConfig, "shapes": ShapesDataConfig},
}


def register_configs() -> None:
    """Stores the schemas in Hydra's ConfigStore: ``train_schema`` and ``schema/<group>/<name>``, which the YAML
    files of ``conf/`` name first in their defaults list."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
