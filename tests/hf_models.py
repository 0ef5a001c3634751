"""Small transformers causal LMs and token data for the Hugging Face adapter's tests (float64 on CPU)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, LlamaConfig, PretrainedConfig

from lightning_bfpp.adapters.huggingface import HuggingFaceCausalLM

VOCAB = 97
SEQUENCE = 12
LR, WEIGHT_DECAY = 1e-2, 0.1


def config(family: str, tied: bool, attn: str = "sdpa") -> PretrainedConfig:
    """A 4-block GPT-2 or Llama config without dropout; ``tied``: the LM head reuses the token embedding."""
    if family == "gpt2":
        cfg: PretrainedConfig = GPT2Config(
            n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32, tie_word_embeddings=tied,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
    else:
        cfg = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tied,
        )  # fmt: skip
    cfg._attn_implementation = attn
    return cfg


def build_adapter(source: str | dict[str, Any], attn: str = "sdpa") -> HuggingFaceCausalLM:
    """The adapter from a ``save_pretrained`` directory or a config dict (run_job's ``model_class``)."""
    return HuggingFaceCausalLM(source, lr=LR, weight_decay=WEIGHT_DECAY, attn_implementation=attn)


class TokenData(Dataset):
    """Random token sequences of one length (no padding: every micro-batch has as many labelled tokens)."""

    def __init__(self, size: int) -> None:
        self.ids = torch.randint(0, VOCAB, (size, SEQUENCE), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}
