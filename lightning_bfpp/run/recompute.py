"""Activation checkpointing of a stage: run its layers so that backward recomputes what the forward did not keep.

``"none"`` keeps every activation autograd saves. ``"layer"`` keeps only each layer's inputs and recomputes the layer
in backward; ``"stage"`` keeps only the stage's input and recomputes the whole stage. Both use non-reentrant
:func:`torch.utils.checkpoint.checkpoint`, which also replays the random state (dropout masks are the same).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

ACTIVATION_CHECKPOINTING = ("none", "stage", "layer")

StageIO = Tensor | tuple[Tensor, ...]
LayerForward = Callable[[int, nn.Module, StageIO, Any], StageIO]
"""``layer_forward(index, layer, inputs, batch)``: runs one layer (the module's ``pipeline_layer_forward``)."""


def _recomputed(fn: Callable[[StageIO], StageIO], inputs: StageIO) -> StageIO:
    """``fn(inputs)`` under a checkpoint; a tuple's tensors are passed one by one, so each is saved as an input."""
    if isinstance(inputs, tuple):
        return checkpoint(lambda *tensors: fn(tuple(tensors)), *inputs, use_reentrant=False)
    return checkpoint(fn, inputs, use_reentrant=False)


def run_layers(
    layer_forward: LayerForward,
    layers: Sequence[tuple[int, nn.Module]],
    inputs: StageIO,
    batch: Any,
    mode: str = "none",
) -> StageIO:
    """Runs ``(index, layer)`` pairs in order from ``inputs``, checkpointed per ``mode`` (see the module docstring).

    Without gradients (evaluation) nothing is saved, so every mode runs the layers plainly.
    """
    if mode not in ACTIVATION_CHECKPOINTING:
        choices = ", ".join(map(repr, ACTIVATION_CHECKPOINTING))
        raise ValueError(f"activation_checkpointing={mode!r} is not supported: choose one of {choices}.")

    def run_all(x: StageIO) -> StageIO:
        for index, layer in layers:
            x = _call_layer(layer_forward, index, layer, x, batch)
        return x

    if mode == "none" or not torch.is_grad_enabled() or not layers:
        return run_all(inputs)
    if mode == "stage":
        return _recomputed(run_all, inputs)
    x = inputs
    for index, layer in layers:
        x = _recomputed(lambda y, index=index, layer=layer: _call_layer(layer_forward, index, layer, y, batch), x)
    return x


class LayerCallError(TypeError):
    """A layer could not take what the layer before it returned (a tuple is spread into the next layer's
    positional arguments)."""


def _call_layer(layer_forward: LayerForward, index: int, layer: nn.Module, x: StageIO, batch: Any) -> StageIO:
    """``layer_forward(index, layer, x, batch)``; a ``TypeError`` about the arguments of a layer given a tuple is
    re-raised saying the convention and how to change it."""
    try:
        return layer_forward(index, layer, x, batch)
    except TypeError as error:
        if not isinstance(x, tuple) or "argument" not in str(error) or isinstance(error, LayerCallError):
            raise
        raise LayerCallError(
            f"Layer {index} ({type(layer).__name__}) was given a tuple of {len(x)} tensors, which bfpp spreads into "
            f"the layer's positional arguments (`layer(*outputs)`, as torch.distributed.pipelining does), and failed: "
            f"{error}. Return a single tensor from the layer before it, accept the tensors as separate arguments, or "
            "override `pipeline_layer_forward(index, layer, inputs, batch)` to call the layer as it expects."
        ) from error
