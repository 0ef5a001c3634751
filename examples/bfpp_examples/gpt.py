"""A GPT-style decoder as a :class:`~lightning_bfpp.PipelineModule`.

The pipeline layers are ``[embedding, block_0, ..., block_{n-1}, head]``: the first layer turns token ids into
vectors (token plus position embedding), the blocks are pre-norm transformer blocks with causal self-attention, the
last layer is the final norm and the language-model head. Between stages only the hidden states (``B x T x C``)
travel; the causal mask is built inside each block, so no side input is needed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bfpp_examples.optim import adamw_warmup_cosine
from lightning_bfpp import PipelineModule


def _logits(outputs: Tensor) -> Tensor:
    """``(B, T, vocab)`` logits as ``(B * T, vocab)``, in float32 or wider (bf16/fp16 upcast, float64 kept)."""
    return outputs.flatten(0, 1).to(torch.promote_types(outputs.dtype, torch.float32))


class Embedding(nn.Module):
    """Token plus learned position embedding: ``(B, T)`` ids to ``(B, T, C)``."""

    def __init__(self, vocab_size: int, seq_len: int, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, n_embd)
        self.positions = nn.Embedding(seq_len, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.dropout(self.tokens(ids) + self.positions(positions))


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"model.n_embd={n_embd} must be a multiple of model.n_head={n_head}.")
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention and a 4x MLP, each with a residual connection."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd, bias=bias),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd, bias=bias),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Head(nn.Module):
    """Final layer norm and the language-model head: ``(B, T, C)`` to logits ``(B, T, vocab)``."""

    def __init__(self, n_embd: int, vocab_size: int, bias: bool) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(x))


class GPT(PipelineModule):
    """A decoder-only language model trained on batches ``{"input_ids": (B, T), "labels": (B, T)}``.

    Arguments:
        vocab_size: the number of token ids (256 for bytes).
        seq_len: the context length (the size of the position embedding).
        n_layer, n_head, n_embd, dropout, bias: the transformer's shape.
        optim: the optimizer settings (see :func:`~bfpp_examples.optim.adamw_warmup_cosine`).
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        n_layer: int = 6,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
        optim: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embedding = Embedding(vocab_size, seq_len, n_embd, dropout)
        self.blocks = nn.ModuleList([Block(n_embd, n_head, dropout, bias) for _ in range(n_layer)])
        self.head = Head(n_embd, vocab_size, bias)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # -------------------------------------------------------------------------------------------- pipeline hooks
    def pipeline_layers(self) -> list[nn.Module]:
        return [self.embedding, *self.blocks, self.head]

    def pipeline_input(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["input_ids"]

    def pipeline_loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        loss = F.cross_entropy(_logits(outputs), batch["labels"].flatten())
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    # ---------------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(_logits(self(batch)), batch["labels"].flatten())
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        return adamw_warmup_cosine(self, self.hparams.optim)
