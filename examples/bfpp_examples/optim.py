"""AdamW with linear warm-up and cosine decay, shared by the example models."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch

DEFAULTS = {"lr": 2e-3, "weight_decay": 0.1, "betas": (0.9, 0.95), "warmup_steps": 30, "min_lr_ratio": 0.1}


def adamw_warmup_cosine(module: pl.LightningModule, optim: dict[str, Any] | None = None) -> dict[str, Any]:
    """``configure_optimizers`` for ``module``: weight decay on matrices only; the learning rate warms up linearly
    for ``warmup_steps``, then decays along a cosine to ``min_lr_ratio * lr`` at ``trainer.max_steps``.

    Under ``strategy=bfpp`` this runs after the module has been split, so ``module.parameters()`` are this rank's
    stages only: each rank builds the optimizer of its own parameters.
    """
    optim = {**DEFAULTS, **(optim or {})}
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim["weight_decay"]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]))
    warmup, min_ratio = optim["warmup_steps"], optim["min_lr_ratio"]
    total = module.trainer.max_steps if module.trainer.max_steps and module.trainer.max_steps > 0 else None

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if total is None or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
