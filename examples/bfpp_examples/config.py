"""The examples' model and data configs (dataclasses) behind ``conf/``; the job, trainer, checkpoint and strategy
configs are the package's (:mod:`lightning_bfpp.hydra`).

Hydra merges each YAML file of ``conf/`` onto one of these dataclasses, so a misspelt key or a value of the wrong
type fails while the config is composed, with a message naming the key (``full_key: model.n_layer``).
"""

from dataclasses import dataclass, field

from lightning_bfpp.hydra import TrainConfig
from lightning_bfpp.hydra import register_configs as register_package_configs


@dataclass
class OptimConfig:
    """AdamW with a linear warm-up and a cosine decay to ``min_lr_ratio * lr`` at ``trainer.max_steps``."""

    lr: float = 2e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1


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
class ExampleTrainConfig(TrainConfig):
    """The top level of ``conf/train.yaml`` and ``conf/train_convnet.yaml``: the package's job config, plus the
    optimizer and the progress reports of the examples."""

    log_interval: int = 10  # print loss and throughput every so many optimizer steps
    optim: OptimConfig = field(default_factory=OptimConfig)


def register_configs() -> None:
    """Stores the job's schema (``train_schema``), the strategies' and the examples' model and data schemas
    (``schema/<group>/<name>``, which the YAML files of ``conf/`` name first in their defaults list)."""
    register_package_configs(
        ExampleTrainConfig,
        model={"gpt": GPTConfig, "litgpt": LitGPTModelConfig, "convnet": ConvNetConfig},
        data={"text": TextDataConfig, "shapes": ShapesDataConfig},
    )
