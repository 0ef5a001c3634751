"""The transformers model families :class:`~lightning_bfpp.adapters.huggingface.HuggingFaceCausalLM` knows: where
each keeps its layers, and the checks that a config or a model is one of them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class Family:
    """Where a family of transformers models keeps its layers: the attribute names inside the base model."""

    base: str  # the base model's attribute in the *ForCausalLM model
    embeddings: tuple[str, ...]  # the embedding layers, in order
    blocks: str  # the ModuleList of decoder blocks
    norm: str  # the final norm
    causal_lm: str  # the transformers class with the LM head (what AutoModelForCausalLM builds)
    rotary: str | None = None  # the rotary embedding whose cos/sin every block takes, if any
    positions: str | None = None  # the config field holding the size of a learned position table, if any


FAMILIES = {
    "gpt2": Family(
        base="transformer",
        embeddings=("wte", "wpe"),
        blocks="h",
        norm="ln_f",
        causal_lm="GPT2LMHeadModel",
        positions="n_positions",
    ),
    "llama": Family(
        base="model",
        embeddings=("embed_tokens",),
        blocks="layers",
        norm="norm",
        causal_lm="LlamaForCausalLM",
        rotary="rotary_emb",
    ),
}


def family_of(config: PretrainedConfig) -> Family:
    """The layer layout of ``config``'s model type; a clear error for a type the adapter does not know."""
    family = FAMILIES.get(getattr(config, "model_type", None) or "")
    if family is None:
        raise ValueError(
            f"HuggingFaceCausalLM supports the model types {sorted(FAMILIES)}, not {config.model_type!r}: use a GPT-2 "
            "or Llama model, or write a PipelineModule for this architecture."
        )
    return family


def check_causal_lm(model: PreTrainedModel) -> None:
    """Raises unless ``model`` is a causal language model of a supported family with its LM head (what
    ``AutoModelForCausalLM`` builds): not a base model (``GPT2Model``) nor another head (``*ForSequenceClassification``
    and the like)."""
    family = family_of(model.config)
    children = dict(model.named_children())
    if set(children) != {family.base, "lm_head"} or not isinstance(children["lm_head"], nn.Linear):
        supported = ", ".join(f.causal_lm for f in FAMILIES.values())
        raise TypeError(
            f"HuggingFaceCausalLM trains a causal language model with its LM head ({supported}), not "
            f"{type(model).__name__} (submodules {sorted(children)}): load the model with AutoModelForCausalLM "
            "(from_pretrained or from_config), or pass its save_pretrained directory or its config."
        )


def as_config(config: PretrainedConfig | Mapping[str, Any]) -> PretrainedConfig:
    """A transformers config from a config or its ``to_dict()``."""
    if isinstance(config, PretrainedConfig):
        return config
    values = dict(config)
    if "model_type" not in values:
        raise ValueError("A config given as a dict needs its 'model_type' (as PretrainedConfig.to_dict() writes).")
    return AutoConfig.for_model(values.pop("model_type"), **values)
