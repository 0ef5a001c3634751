"""Batched weight gradients: one matrix product per ``nn.Linear`` and run of backwards, instead of one per micro-batch.

A breadth-first schedule runs the backwards of a stage for all its micro-batches one after the other (a *run*, see
:func:`lightning_bfpp.plan.gathering.compute_runs`). With ``weight_gradients="batched"`` each ``nn.Linear`` of the
rank's stages computes only its input gradient (and its cheap bias gradient) in each backward and keeps the
micro-batch's input and output gradient; after the run's last backward (and its send of the input gradient), the
weight gradient of the whole run is one product ``grad_outputs^T @ inputs`` over all its rows, added to ``weight.grad``.

That replaces ``M`` products with an inner dimension of one micro-batch, and ``M - 1`` reads and writes of the
accumulated gradient, by a single product: faster where small matrix products are inefficient (CPU, or small
micro-batches on GPU). It costs memory: each Linear's inputs are kept until the end of the run instead of the end of
their micro-batch's backward, and its output gradients are kept too (about one stage's Linear activations for all
micro-batches of the run). Depth-first schedules have runs of one backward, so nothing is batched there.

The sum over micro-batches is the same; only its order differs, as with any change of matrix-product shape.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHT_GRADIENTS = ("per_micro_batch", "batched")
"""``per_micro_batch``: autograd's usual weight gradient in every backward; ``batched``: see the module docstring."""

_DEFERRED_ATTRIBUTE = "_bfpp_deferred_weight_grad"


class _DeferredWeightGrad:
    """The inputs and output gradients one Linear has seen in the backwards of the current run."""

    def __init__(self, linear: nn.Linear) -> None:
        self.linear = linear
        self.inputs: list[Tensor] = []
        self.grad_outputs: list[Tensor] = []

    def flush(self) -> None:
        """Adds the run's weight gradient, ``sum_m g_m^T x_m`` as one product, to ``weight.grad``."""
        if not self.inputs:
            return
        grad_out = torch.cat(self.grad_outputs) if len(self.grad_outputs) > 1 else self.grad_outputs[0]
        inputs = torch.cat(self.inputs) if len(self.inputs) > 1 else self.inputs[0]
        self.inputs, self.grad_outputs = [], []
        weight = self.linear.weight
        grad = grad_out.t().mm(inputs).to(weight.dtype)
        if weight.grad is None:
            weight.grad = grad
        else:
            weight.grad.add_(grad)


class _LinearDeferringWeightGrad(torch.autograd.Function):
    """``F.linear`` whose backward returns the input and bias gradients and hands the weight gradient's operands to
    the layer's :class:`_DeferredWeightGrad`. Under autocast the forward computes in the autocast dtype, as
    ``F.linear`` would, and saves the cast operands: the backward (outside autocast, as Lightning runs it) and the
    deferred product then compute in that dtype too, as autograd's gradients of the cast operands would."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, deferred: _DeferredWeightGrad) -> Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):  # compute in the autocast dtype, as F.linear would
            dtype = torch.get_autocast_dtype(device_type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            out = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.deferred, ctx.has_bias = deferred, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        grad_out = grad_out.to(weight.dtype)
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_bias = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        ctx.deferred.inputs.append(x.reshape(-1, x.shape[-1]))
        ctx.deferred.grad_outputs.append(rows)
        return grad_x, None, grad_bias, None


def _deferring_forward(self: nn.Linear, x: Tensor) -> Tensor:
    if torch.is_grad_enabled() and self.weight.requires_grad:
        return _LinearDeferringWeightGrad.apply(x, self.weight, self.bias, getattr(self, _DEFERRED_ATTRIBUTE))
    return F.linear(x, self.weight, self.bias)


def _plain_linears(layers: Iterable[nn.Module]) -> list[nn.Linear]:
    """The ``nn.Linear`` modules (subclasses only when they keep Linear's forward), each once."""
    found: dict[int, nn.Linear] = {}
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
                found.setdefault(id(module), module)
    return list(found.values())


class WeightGradientBatcher:
    """Defers the weight gradients of the ``nn.Linear`` modules of each local stage over a run of its backwards.

    The executor calls :meth:`flush` with a stage at the schedule's ``BACKWARD_WEIGHT`` actions, which
    :func:`lightning_bfpp.plan.weight_flush.add_weight_flush` places after each run of backwards. :meth:`remove`
    restores the layers.

    Arguments:
        stage_layers: the layers of each local stage.
    """

    def __init__(self, stage_layers: Mapping[int, Sequence[nn.Module]]) -> None:
        self._stages: dict[int, list[_DeferredWeightGrad]] = {}
        for stage, layers in stage_layers.items():
            deferred = []
            for linear in _plain_linears(layers):
                if _DEFERRED_ATTRIBUTE in linear.__dict__:
                    raise ValueError(
                        f"An nn.Linear is used by two stages (stage {stage} and another): batched weight gradients "
                        "need each Linear module in one stage; use weight_gradients='per_micro_batch'."
                    )
                state = _DeferredWeightGrad(linear)
                linear.__dict__[_DEFERRED_ATTRIBUTE] = state
                linear.forward = types.MethodType(_deferring_forward, linear)  # type: ignore[method-assign]
                deferred.append(state)
            self._stages[stage] = deferred

    @property
    def num_layers(self) -> int:
        """How many Linear modules have their weight gradients batched."""
        return sum(len(d) for d in self._stages.values())

    def flush(self, stage: int) -> None:
        """Adds the weight gradients of ``stage``'s finished backwards to its Linear weights' ``.grad``."""
        for deferred in self._stages.get(stage, ()):
            deferred.flush()

    def discard(self) -> None:
        """Drops what a failed step left deferred (its gradients are incomplete anyway)."""
        for deferred in (d for ds in self._stages.values() for d in ds):
            deferred.inputs, deferred.grad_outputs = [], []

    def remove(self) -> None:
        """Gives every Linear back its own forward."""
        for deferred in (d for ds in self._stages.values() for d in ds):
            deferred.linear.__dict__.pop("forward", None)
            deferred.linear.__dict__.pop(_DEFERRED_ATTRIBUTE, None)
        self._stages = {}
