"""Activation checkpointing: fewer bytes saved for backward, the same gradients, the same training as one process."""

from __future__ import annotations

import pytest
import torch
from models import StackModel
from test_equivalence import assert_matches, reference

from lightning_bfpp import BFPPStrategy
from lightning_bfpp.run.recompute import run_layers

MICRO_BATCHES, ROWS, WIDTH = 3, 5, 8


def saved_bytes_of_stage(mode: str) -> tuple[int, int, list[torch.Tensor]]:
    """Bytes of the distinct non-parameter tensors autograd keeps for backward while one stage runs its forward
    over every micro-batch; also the bytes of one stage input, and the parameter gradients after backward."""
    torch.manual_seed(0)
    model = StackModel(num_blocks=4, width=WIDTH).double()
    layers = [(1 + i, block) for i, block in enumerate(model.blocks)]  # a middle stage: the 4 blocks
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inputs = [torch.randn(ROWS, WIDTH, dtype=torch.float64, requires_grad=True) for _ in range(MICRO_BATCHES)]
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = [run_layers(model.pipeline_layer_forward, layers, x, {}, mode) for x in inputs]
    torch.autograd.backward([y.sum() for y in outputs])
    grads = [p.grad.clone() for p in model.blocks.parameters()] + [x.grad.clone() for x in inputs]
    return sum(kept.values()), inputs[0].nbytes, grads


def test_checkpointing_saves_fewer_bytes_for_backward_and_keeps_the_gradients() -> None:
    none, input_bytes, reference = saved_bytes_of_stage("none")
    layer, _, layer_grads = saved_bytes_of_stage("layer")
    stage, _, stage_grads = saved_bytes_of_stage("stage")
    layers = 4
    assert stage == MICRO_BATCHES * input_bytes  # only each micro-batch's stage input
    assert layer == MICRO_BATCHES * layers * input_bytes  # only each layer's input
    assert none >= 2 * layer  # each block keeps its input and its tanh output
    for grads in (layer_grads, stage_grads):
        for got, want in zip(grads, reference, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_evaluation_runs_the_layers_plainly() -> None:
    model = StackModel(num_blocks=2, width=WIDTH).double()
    layers = list(enumerate(model.pipeline_layers()))[1:3]
    x = torch.randn(ROWS, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        y = run_layers(model.pipeline_layer_forward, layers, x, {}, "stage")
    assert not y.requires_grad
    torch.testing.assert_close(y, model.blocks[1](model.blocks[0](x)))


@pytest.mark.parametrize("mode", ["none", "layer"])
def test_a_layer_that_cannot_take_a_tuple_is_named_with_the_convention(mode: str) -> None:
    """A layer returning a tuple has it spread into the next layer's arguments: a layer that takes one tensor fails,
    and the error says which layer, the convention and how to change it (not just ``forward() takes 2 positional
    arguments``)."""
    from lightning_bfpp.run.recompute import LayerCallError

    class Pair(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x * 2

    layers = [(3, Pair()), (4, torch.nn.Linear(2, 2))]

    def default_forward(index: int, layer: torch.nn.Module, x, batch):
        return layer(*x) if isinstance(x, tuple) else layer(x)

    with pytest.raises(LayerCallError) as info:
        run_layers(default_forward, layers, torch.ones(1, 2, requires_grad=True), None, mode)
    message = str(info.value)
    assert "Layer 4 (Linear) was given a tuple of 2 tensors" in message
    assert "layer(*outputs)" in message and "pipeline_layer_forward" in message
    assert "positional argument" in message  # the original error is kept


def test_unknown_mode_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"activation_checkpointing='stages'.*'none', 'stage', 'layer'"):
        BFPPStrategy(activation_checkpointing="stages")


@pytest.mark.parametrize(("mode", "tuple_io"), [("layer", True), ("stage", False)])
def test_checkpointed_training_matches_one_process(run_job, mode: str, tuple_io: bool) -> None:
    config = {
        "devices": 2,
        "strategy": {
            "pipeline_parallel_size": 2,
            "stages_per_rank": 2,
            "micro_batches": 4,
            "activation_checkpointing": mode,
        },
        "model": {"num_blocks": 4, "tuple_io": tuple_io, "optimizer": "adam"},
        "batch_size": 8,
        "max_steps": 3,
        "count_saved_bytes": True,
    }
    result = run_job(config, timeout=150)
    assert_matches(result, config, 1)
    # the option reaches the stages: the pipeline keeps far fewer bytes for backward than one process without it
    pipelined = sum(rank["saved_bytes"] for rank in result.ranks())
    assert pipelined < 0.6 * reference(config, 1)["saved_bytes"]
