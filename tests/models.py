"""Small layer-stack modules used by the tests; float64 on CPU makes pipelined and one-process runs comparable."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_bfpp import PipelineModule


class Block(nn.Module):
    """A residual tanh block."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.tanh(self.linear(x))


class TupleBlock(nn.Module):
    """Takes and returns (hidden, running sum); reads a mask side input from the batch."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, h: Tensor, total: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h = h + torch.tanh(self.linear(h)) * mask
        return h, total + h.mean(dim=-1, keepdim=True)


class TiedHead(nn.Module):
    """An output layer that reuses the input projection's weight (``width x in_features``), as an LM head reuses the
    token embedding: ``(h @ W).sum(-1)``."""

    def __init__(self, width: int, in_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width, in_features))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, h: Tensor) -> Tensor:
        return (h @ self.weight).sum(-1, keepdim=True) + self.bias

    def reset_parameters(self) -> None:  # of a tied weight, the first layer's initialization wins
        nn.init.normal_(self.weight, std=0.5)
        nn.init.zeros_(self.bias)


class StackModel(PipelineModule):
    """``num_blocks`` blocks between an input and an output projection: ``num_blocks + 2`` pipeline layers. With
    ``tied``, the output layer uses the input projection's weight (the same parameter: ``head.weight`` is
    ``first.weight``). With ``skip_block``, that block is left out of training steps of odd optimizer steps (its
    parameters get no gradient then). With ``gate_block``, that block acts on the samples whose first feature exceeds
    1 only, and is left out of a micro-batch that has none (so replicas can disagree on whether its parameters get a
    gradient). ``optimizer``: ``sgd`` (momentum), ``adam`` or ``adamw`` (weight decay), or a key of
    :data:`OPTIMIZERS` (two parameter groups). With ``step_scheduler``, the learning rate decays by 0.7 every
    optimizer step (a scheduler with ``interval="step"``)."""

    def __init__(
        self,
        num_blocks: int = 6,
        width: int = 8,
        in_features: int = 4,
        optimizer: str = "sgd",
        lr: float = 0.1,
        tuple_io: bool = False,
        wide_blocks: tuple[int, ...] = (),
        tied: bool = False,
        skip_block: int | None = None,
        gate_block: int | None = None,
        step_scheduler: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tuple_io = tuple_io
        self.skip_block, self.gate_block = skip_block, gate_block
        self.first = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(
            [
                (TupleBlock(width) if tuple_io else Block(width)) if i not in wide_blocks else WideBlock(width)
                for i in range(num_blocks)
            ]
        )
        self.head = TiedHead(width, in_features) if tied else nn.Linear(width, 1)
        if tied:
            self.head.weight = self.first.weight

    def pipeline_layers(self) -> list[nn.Module]:
        return [self.first, *self.blocks, self.head]

    def pipeline_input(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["x"].to(self.first.weight.dtype)

    def pipeline_layer_forward(self, index: int, layer: nn.Module, inputs: Any, batch: dict[str, Tensor]) -> Any:
        skip, gate = self.skip_block, self.gate_block
        if skip is not None and index == skip + 1 and self.training and self.global_step % 2 == 1:
            return inputs
        if gate is not None and index == gate + 1:
            selected = (batch["x"][:, :1] > 1).to(inputs.dtype)
            return inputs + selected * torch.tanh(layer.linear(inputs)) if selected.any() else inputs
        if not self.tuple_io or layer is self.first or layer is self.head:
            if layer is self.head and isinstance(inputs, tuple):
                h, total = inputs
                return layer(h) + total
            if layer is self.first and self.tuple_io:
                h = layer(inputs)
                return h, torch.zeros_like(h[..., :1])
            return layer(inputs)
        return layer(*inputs, batch["mask"])

    def pipeline_loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        loss = F.mse_loss(outputs.squeeze(-1).to(batch["y"].dtype), batch["y"])
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.mse_loss(self(batch).squeeze(-1), batch["y"])
        self.log("val_loss", loss)
        return loss

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch).squeeze(-1)

    def configure_optimizers(self) -> Any:
        optimizer = self._optimizer()
        if not self.hparams.get("step_scheduler"):
            return optimizer
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)  # once per optimizer step
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _optimizer(self) -> Any:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr * 0.1)
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr * 0.1, weight_decay=0.5)
        if self.hparams.optimizer in OPTIMIZERS:  # with two parameter groups: the biases without weight decay
            weights = [p for name, p in self.named_parameters() if not name.endswith("bias")]
            biases = [p for name, p in self.named_parameters() if name.endswith("bias")]
            groups = [{"params": weights}, {"params": biases, "weight_decay": 0.0}]
            return OPTIMIZERS[self.hparams.optimizer](groups, lr=self.hparams.lr * 0.1, weight_decay=0.01)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class WarmupAdam(torch.optim.Adam):
    """A user's optimizer with a constructor argument of its own (stored in ``defaults``): the learning rate rises
    linearly over the first ``warmup`` steps."""

    def __init__(self, params: Any, lr: float, *, warmup: int = 3, **kwargs: Any) -> None:
        super().__init__(params, lr=lr, **kwargs)
        self.defaults["warmup"] = warmup
        self.steps_taken = 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        self.steps_taken += 1
        lrs = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] *= min(1.0, self.steps_taken / self.defaults["warmup"])
        try:
            return super().step(closure)
        finally:
            for group, lr in zip(self.param_groups, lrs, strict=True):
                group["lr"] = lr


def _warmup_adam(params: Any, lr: float, weight_decay: float) -> WarmupAdam:
    return WarmupAdam(params, lr=lr, warmup=5, weight_decay=weight_decay)


# every torch.optim optimizer that takes parameter groups, LBFGS (which ZeRO-1 refuses) and a user's subclass
OPTIMIZERS: dict[str, Any] = {
    **{
        name.lower(): getattr(torch.optim, name)
        for name in ("Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam", "RMSprop", "ASGD")
    },
    "sgd_groups": lambda params, **kw: torch.optim.SGD(params, momentum=0.9, **kw),
    "adam_groups": torch.optim.Adam,
    "adamw_groups": torch.optim.AdamW,
    "rprop": lambda params, lr, weight_decay: torch.optim.Rprop(params, lr=lr),
    "warmup_adam": _warmup_adam,
    "lbfgs": lambda params, lr, weight_decay: torch.optim.LBFGS([p for g in params for p in g["params"]], lr=lr),
}


class WideBlock(Block):
    """A block with 4x the parameters of :class:`Block`, to unbalance parameter counts."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.extra = nn.Linear(width, width * 3)
        self.back = nn.Linear(width * 3, width)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + 0.1 * self.back(torch.tanh(self.extra(x)))


class RegressionData(Dataset):
    """Deterministic regression samples with a 0/1 mask side input."""

    def __init__(self, size: int = 96, in_features: int = 4, width: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, in_features, generator=g, dtype=torch.float64)
        self.y = torch.sin(self.x.sum(-1)) + 0.1 * torch.randn(size, generator=g, dtype=torch.float64)
        self.mask = (torch.rand(size, width, generator=g) > 0.2).to(torch.float64)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "y": self.y[i], "mask": self.mask[i]}


class TokenData(Dataset):
    """Deterministic random token sequences for language models: ``input_ids`` and the next-token ``labels``."""

    def __init__(self, size: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab, (size, seq_len + 1), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.tokens[i, :-1], "labels": self.tokens[i, 1:]}


def loader(batch_size: int, size: int = 96, **kwargs: Any) -> DataLoader:
    return DataLoader(RegressionData(size=size, **kwargs), batch_size=batch_size, shuffle=False, drop_last=True)


class NoHooksModel(StackModel):
    """Forgets the pipeline hooks: an ordinary LightningModule with a training_step."""

    pipeline_layers = PipelineModule.pipeline_layers  # type: ignore[assignment]
    pipeline_loss = PipelineModule.pipeline_loss  # type: ignore[assignment]


class ManualOptimizationModel(StackModel):
    """Asks for manual optimization, which a pipelined step cannot offer."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False


class VectorLossModel(StackModel):
    """Returns a per-sample loss instead of a scalar."""

    def pipeline_loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return (outputs.squeeze(-1) - batch["y"]) ** 2


class DictOutputModel(StackModel):
    """A layer returns a dict, which cannot travel between stages."""

    def pipeline_layer_forward(self, index: int, layer: nn.Module, inputs: Any, batch: dict[str, Tensor]) -> Any:
        inputs = inputs["h"] if isinstance(inputs, dict) else inputs
        out = super().pipeline_layer_forward(index, layer, inputs, batch)
        return out if layer is self.head else {"h": out}


class MetaStackModel(StackModel):
    """:class:`StackModel` built on the meta device: the layers hold no memory until they are materialized and
    initialized (``pipeline_init_layer``: ``reset_parameters()``, plus a layer-dependent shift of the biases)."""

    def __init__(self, **kwargs: Any) -> None:
        with torch.device("meta"):
            super().__init__(**kwargs)

    def pipeline_init_layer(self, index: int, layer: nn.Module) -> None:
        super().pipeline_init_layer(index, layer)
        for name, p in layer.named_parameters():
            if name.endswith("bias"):
                p.add_(0.01 * index)


def rmsnorm_in_input_dtype(self: nn.Module, x: Tensor) -> Tensor:
    """LitGPT's ``RMSNorm.forward`` computed in the dtype of ``x``. LitGPT's own computes in float32 whatever the
    dtype, so a float64 model keeps float32 rounding there, which the order of micro-batches and reductions changes
    (about 1e-6 relative after 3 AdamW steps): the exact comparisons install this on both sides."""
    norm_x = torch.mean(x * x, dim=self.dim, keepdim=True)
    weight = (1 + self.weight) if self.add_unit_offset else self.weight
    return x * torch.rsqrt(norm_x + self.eps) * weight


def litgpt_module(name: str, overrides: dict[str, Any], exact_rmsnorm: bool = False, **kwargs: Any) -> PipelineModule:
    """The LitGPT adapter for ``litgpt.Config.from_name(name, **overrides)`` (litgpt imported only here); with
    ``exact_rmsnorm``, LitGPT's RMSNorm computes in the input's dtype in this process (see
    :func:`rmsnorm_in_input_dtype`)."""
    import litgpt.model
    from litgpt import Config

    from lightning_bfpp.adapters.litgpt import LitGPTModule

    if exact_rmsnorm:
        litgpt.model.RMSNorm.forward = rmsnorm_in_input_dtype
    return LitGPTModule(Config.from_name(name, **overrides), **kwargs)


class TrapModel(StackModel):
    """Makes a call that cannot work under a pipeline (``trap``): a collective inside a hook that runs on the last
    stage only, or ``self(batch)`` outside the pipeline hooks."""

    def __init__(self, trap: str = "all_gather", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.trap = trap

    def pipeline_loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        loss = super().pipeline_loss(outputs, batch)
        if self.trap == "all_gather":
            self.log("gathered", self.all_gather(loss.detach()).mean())
        elif self.trap == "barrier":
            self.trainer.strategy.barrier()
        elif self.trap == "sync_dist_group":
            self.log("grouped", loss, sync_dist=True, sync_dist_group=torch.distributed.group.WORLD)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = super().validation_step(batch, batch_idx)
        if self.trap == "reduce":
            self.log("reduced", self.trainer.strategy.reduce(loss, reduce_op="sum"))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.trap == "forward":
            self(batch)


MODELS: dict[str, Any] = {
    cls.__name__: cls
    for cls in (
        StackModel,
        MetaStackModel,
        NoHooksModel,
        ManualOptimizationModel,
        VectorLossModel,
        DictOutputModel,
        TrapModel,
    )
}
MODELS["LitGPTModule"] = litgpt_module
