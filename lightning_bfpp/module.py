"""The pipeline hooks a LightningModule provides so that its layer stack can be split into stages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

StageIO = Tensor | tuple[Tensor, ...]

REQUIRED_HOOKS = ("pipeline_layers", "pipeline_input", "pipeline_loss")


class PipelineModule(pl.LightningModule):
    """A LightningModule whose body is a stack of layers.

    Subclass it instead of ``LightningModule`` and implement three hooks; the same module then trains on one
    device (``strategy="auto"``/``"ddp"``) and under ``strategy="bfpp"``, with the same losses:

    - :meth:`pipeline_layers`: the ordered layer stack (submodules of this module).
    - :meth:`pipeline_input`: the input of the first layer, taken from the batch.
    - :meth:`pipeline_loss`: the loss, from the last layer's output and the batch (``self.log`` works here).

    Optionally override :meth:`pipeline_layer_forward` to pass side inputs of the batch (masks, positions) to a
    layer. Every pipeline stage sees the current (micro-)batch, so side inputs need no plumbing.
    """

    def pipeline_layers(self) -> Sequence[nn.Module]:
        """The ordered layers to split into pipeline stages. Every parameter must belong to one of them."""
        raise NotImplementedError(f"{type(self).__name__} must implement `pipeline_layers()`.")

    def pipeline_input(self, batch: Any) -> StageIO:
        """The input of the first layer: a tensor or a tuple of tensors taken from ``batch``."""
        raise NotImplementedError(f"{type(self).__name__} must implement `pipeline_input(batch)`.")

    def pipeline_layer_forward(self, index: int, layer: nn.Module, inputs: StageIO, batch: Any) -> StageIO:
        """Runs layer ``index`` of the stack. The default calls ``layer(*inputs)`` for a tuple, ``layer(inputs)``
        otherwise; override it to hand side inputs from ``batch`` to the layer."""
        return layer(*inputs) if isinstance(inputs, tuple) else layer(inputs)

    def pipeline_loss(self, outputs: StageIO, batch: Any) -> Tensor:
        """The scalar loss of ``batch`` from the last layer's ``outputs``, averaged over the batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement `pipeline_loss(outputs, batch)`.")

    def forward(self, batch: Any) -> StageIO:
        """Runs the whole layer stack on ``batch`` (the one-device path)."""
        outputs = self.pipeline_input(batch)
        for index, layer in enumerate(self.pipeline_layers()):
            outputs = self.pipeline_layer_forward(index, layer, outputs, batch)
        return outputs

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One-device training step; ``strategy="bfpp"`` replaces it with the pipelined executor."""
        return self.pipeline_loss(self(batch), batch)


def missing_hooks(module: nn.Module) -> list[str]:
    """The required pipeline hooks that ``module`` does not implement."""
    missing = []
    for name in REQUIRED_HOOKS:
        method = getattr(type(module), name, None)
        if method is None or method is getattr(PipelineModule, name):
            missing.append(name)
    return missing
