"""The main job's ``model=litgpt``: LitGPT's GPT (:mod:`lightning_bfpp.adapters.litgpt`) with the example's optimizer.

Without ``model.checkpoint`` the model is LitGPT's config ``model.name`` (shape keys ``model.n_layer`` ... override
it) with random weights, the vocabulary of the data (256 for the default byte-level data) and a context of
``data.seq_len`` tokens. With ``model.checkpoint`` (a LitGPT checkpoint directory: ``model_config.yaml`` and
``lit_model.pth``) it is that model with its weights, and the data must be token ids of the model's tokenizer
(``data.path=tokens.npy``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import to_absolute_path
from litgpt import Config
from omegaconf import DictConfig, OmegaConf
from typing_extensions import override

from bfpp_examples.optim import adamw_warmup_cosine
from lightning_bfpp.adapters.litgpt import CONFIG_FILENAME, LitGPTModule
from lightning_bfpp.hydra import ConfigError

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "n_query_groups", "head_size", "intermediate_size")


class LitGPT(LitGPTModule):
    """:class:`~lightning_bfpp.adapters.litgpt.LitGPTModule` trained with AdamW, warm-up and cosine decay
    (:func:`~bfpp_examples.optim.adamw_warmup_cosine`)."""

    def __init__(self, config: Config, optim: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.optim = optim

    @override
    def configure_optimizers(self) -> Any:
        return adamw_warmup_cosine(self, self.optim)


def build_litgpt(cfg: DictConfig, vocab_size: int) -> LitGPT:
    """The model of ``cfg.model`` (see the module's docstring) for data of ``vocab_size`` token ids."""
    m = cfg.model
    shape = {key: m[key] for key in SHAPE_KEYS if m[key] is not None}
    optim = OmegaConf.to_container(cfg.optim)
    if m.checkpoint is None:
        try:
            config = Config.from_name(
                m.name, vocab_size=vocab_size, padded_vocab_size=vocab_size, block_size=cfg.data.seq_len, **shape
            )
        except ValueError as error:
            raise ConfigError(f"model.name={m.name}: {error} (see litgpt.config.name_to_config).") from error
        return LitGPT(config, optim, tie_embeddings=m.tie_embeddings)
    if shape:
        raise ConfigError(
            f"model.checkpoint={m.checkpoint} fixes the model's shape, but {', '.join(f'model.{k}' for k in shape)} "
            "is set: drop it, or drop model.checkpoint to train from scratch."
        )
    directory = Path(to_absolute_path(m.checkpoint))
    config = Config.from_file(directory / CONFIG_FILENAME)
    if vocab_size > config.padded_vocab_size or cfg.data.seq_len > config.block_size:
        raise ConfigError(
            f"The data (vocabulary {vocab_size}, data.seq_len={cfg.data.seq_len}) does not fit the model of "
            f"{directory} (vocabulary {config.padded_vocab_size}, block_size {config.block_size}): give token ids of "
            "its tokenizer (data.path=tokens.npy) and a data.seq_len within its block size."
        )
    return LitGPT(config, optim, checkpoint=directory, tie_embeddings=m.tie_embeddings)
