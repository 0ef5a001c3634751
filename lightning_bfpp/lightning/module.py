"""The pipeline hooks a LightningModule provides so that its layer stack can be split into stages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_bfpp.lightning.consolidated import checkpoint_source
from lightning_bfpp.lightning.internals import attached_trainer, restricted_classmethod
from lightning_bfpp.run.materialize import check_materialized, materialize_layers
from lightning_bfpp.run.split import RemoteLayer

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

    Tied weights: give two layers the same ``nn.Parameter`` (``self.head.weight = self.embed.weight``), as on one
    device; under ``strategy="bfpp"`` each rank holding one of them keeps a copy and the copies are trained as one.

    Large models: create the layers on the meta device (``with torch.device("meta"): ...`` in ``__init__``) and,
    if ``reset_parameters()`` of their submodules is not the initialization you want, override
    :meth:`pipeline_init_layer`. Under ``strategy="bfpp"`` each rank materializes only the layers it holds; on one
    device :meth:`configure_model` materializes them all. Both initialize layer ``i`` under the same seed (from the
    run's seed and ``i``), so the initial weights are the same on every layout.
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

    def pipeline_init_layer(self, index: int, layer: nn.Module) -> None:
        """Initializes layer ``index`` of the stack after it has been materialized from the meta device (its tensors
        hold garbage until then). Called under a random seed derived from the run's seed and ``index``, so use the
        global generator (``nn.init.*``). The default calls ``reset_parameters()`` of every submodule that has one;
        override it to initialize other parameters or buffers. A parameter shared with an earlier layer (a tied
        weight) keeps that layer's values whatever this hook does to it."""
        for submodule in layer.modules():
            reset = getattr(submodule, "reset_parameters", None)
            if callable(reset):
                reset()

    def configure_model(self) -> None:
        """Materializes the layers created on the meta device (see :meth:`pipeline_init_layer`), except under
        ``BFPPStrategy``, which materializes only the layers of each rank. Call ``super().configure_model()`` if you
        override it."""
        trainer = attached_trainer(self)
        strategy = getattr(trainer, "strategy", None) if trainer is not None else None
        if getattr(strategy, "materializes_pipeline_layers", False):
            return
        device = strategy.root_device if strategy is not None else torch.device("cpu")
        materialize_layers(self, list(enumerate(self.pipeline_layers())), device)
        check_materialized(self)

    def forward(self, batch: Any) -> StageIO:
        """Runs the whole layer stack on ``batch`` (the one-device path). Under ``strategy="bfpp"`` a rank holds only
        some layers: ``self(batch)`` works inside ``validation_step``, ``test_step`` and ``predict_step`` (it answers
        the pipeline's output there) and raises anywhere else."""
        layers = self.pipeline_layers()
        if any(isinstance(layer, RemoteLayer) for layer in layers):
            raise RuntimeError(
                f"{type(self).__name__}.forward (`self(batch)`) was called outside the pipeline hooks, on a rank that "
                "holds only some of the layers (BFPPStrategy split the module). Run the model through the pipeline: "
                "call self(batch) in validation_step, test_step or predict_step (there it returns the last layer's "
                "output) and use trainer.validate/test/predict; or load a checkpoint into a fresh module on one "
                "process (strategy='auto')."
            )
        outputs = self.pipeline_input(batch)
        for index, layer in enumerate(layers):
            outputs = self.pipeline_layer_forward(index, layer, outputs, batch)
        return outputs

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One-device training step; ``strategy="bfpp"`` replaces it with the pipelined executor."""
        return self.pipeline_loss(self(batch), batch)

    @restricted_classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """``LightningModule.load_from_checkpoint``, which also reads a checkpoint directory written by
        ``strategy="bfpp"`` (``save_distributed_checkpoint=True``, the default), whatever layout wrote it: its weights
        and hyper-parameters, in this process."""
        source = checkpoint_source(checkpoint_path, weights_only)
        return super().load_from_checkpoint(source, map_location, hparams_file, strict, weights_only, **kwargs)


def missing_hooks(module: nn.Module) -> list[str]:
    """The required pipeline hooks that ``module`` does not implement."""
    missing = []
    for name in REQUIRED_HOOKS:
        method = getattr(type(module), name, None)
        if method is None or method is getattr(PipelineModule, name):
            missing.append(name)
    return missing


def check_pipeline_module(module: pl.LightningModule) -> None:
    """Raises if ``module`` cannot be pipelined: a pipeline hook missing, or manual optimization."""
    missing = missing_hooks(module)
    if missing:
        raise TypeError(
            f"{type(module).__name__} lacks the pipeline hooks {missing}: subclass `lightning_bfpp.PipelineModule` "
            "and implement pipeline_layers(), pipeline_input(batch) and pipeline_loss(outputs, batch)."
        )
    if not module.automatic_optimization:
        raise ValueError(
            "BFPPStrategy runs forward and backward itself and needs automatic optimization: remove "
            "`self.automatic_optimization = False` from the module."
        )
