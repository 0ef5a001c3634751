"""Large models: layers built on the meta device; each rank materializes only its own, with the initial weights of one
process, and the training matches one process."""

from __future__ import annotations

import pytest
import torch
from models import MetaStackModel, StackModel
from test_equivalence import assert_matches, reference

from lightning_bfpp.plan.partition import build_partition
from lightning_bfpp.run.materialize import materialize_layers


def test_layer_initialization_depends_on_the_layer_only() -> None:
    """Layer ``i`` gets the same values whether materialized alone or with the others; a tied weight keeps the
    values of its first layer."""
    whole = MetaStackModel(num_blocks=4, tied=True)
    whole.configure_model()
    part = MetaStackModel(num_blocks=4, tied=True)
    layers = part.pipeline_layers()
    materialize_layers(part, [(2, layers[2]), (5, layers[5])], torch.device("cpu"))
    assert torch.equal(part.blocks[1].linear.weight, whole.blocks[1].linear.weight)
    assert torch.equal(part.head.bias, whole.head.bias)
    assert part.first.weight.is_meta and part.blocks[0].linear.weight.is_meta  # not materialized
    assert not torch.equal(whole.blocks[0].linear.weight, whole.blocks[1].linear.weight)  # one seed per layer
    head_alone = MetaStackModel(num_blocks=4, tied=True)
    head_alone.head.weight = torch.nn.Parameter(torch.empty(8, 4, device="meta"))  # untie to see the head's own init
    head_alone.configure_model()
    assert whole.head.weight is whole.first.weight
    assert not torch.equal(whole.head.weight, head_alone.head.weight)  # the head's init did not win


def held_parameters(full: StackModel, P: int, L: int, rank: int) -> dict[str, torch.nn.Parameter]:
    """The parameters (by name in the unsplit module, a tied weight once) of the layers pipeline ``rank`` holds."""
    layers = full.pipeline_layers()
    partition = build_partition(layers, P, L)
    names = {id(p): name for name, p in full.named_parameters()}
    held = [i for stage in partition.stages_of(rank) for i in partition.layers_of(stage)]
    return {names[id(p)]: p for i in held for p in layers[i].parameters()}


@pytest.mark.parametrize(
    ("layout", "tied", "optimizer"),
    [pytest.param((2, 1, 2), False, "adam", id="P2-L1"), pytest.param((2, 2, 4), True, "sgd", id="P2-L2-tied")],
)
def test_meta_layers_materialize_per_rank(run_job, layout: tuple[int, int, int], tied: bool, optimizer: str) -> None:
    P, L, M = layout
    model = {"num_blocks": 2 * P * L - 2, "width": 16, "tied": tied, "optimizer": optimizer}
    config = {
        "devices": P,
        "model_class": "MetaStackModel",
        "strategy": {"pipeline_parallel_size": P, "stages_per_rank": L, "micro_batches": M},
        "model": model,
        "batch_size": 2 * M,
        "max_steps": 2,
        "record_initial": True,
    }
    result = run_job(config, timeout=180)
    ranks = result.ranks()
    ref = reference(config, 1)

    # the initial weights of every rank are those of one process (a tied copy included)
    seen: set[str] = set()
    for rank in ranks:
        for name, value in rank["initial"].items():
            assert torch.equal(value, ref["initial"][name]), name
            seen.add(name)
    assert seen == set(ref["initial"])

    # each rank holds the parameters of its own layers only
    full = StackModel(**model).double()
    total = sum(p.numel() * p.element_size() for p in full.parameters())
    for rank in ranks:
        mine = held_parameters(full, P, L, rank["rank"])
        assert rank["param_bytes"] == sum(p.numel() * p.element_size() for p in mine.values())
        assert rank["param_bytes"] < 0.6 * total

    assert_matches(result, config, 1)  # and the training is that of one process


def test_init_module_empty_init_builds_on_meta(run_job) -> None:
    """A module built under ``trainer.init_module(empty_init=True)`` is on the meta device until set-up; each rank
    then allocates and initializes its own layers only, with the weights of the same module built on the meta device
    and materialized on one process, and trains as one process does."""
    P, L, M = 2, 1, 2
    model = {"num_blocks": 2, "width": 16, "optimizer": "adam"}
    config = {
        "devices": P,
        "build_on": "init_module",
        "strategy": {"pipeline_parallel_size": P, "stages_per_rank": L, "micro_batches": M},
        "model": model,
        "batch_size": 2 * M,
        "max_steps": 2,
        "record_initial": True,
    }
    result = run_job(config, timeout=180)
    ranks = result.ranks()
    ref = reference({**config, "build_on": "meta"}, 1)

    full = StackModel(**model)
    for rank in ranks:
        assert rank["allocated_before_setup"] == []  # nothing had storage before the strategy's set-up
        mine = set(held_parameters(full, P, L, rank["rank"]))
        assert mine and set(rank["initial"]) == mine  # after set-up, this rank's layers only
        for name, value in rank["initial"].items():
            assert value.dtype == torch.float64
            assert torch.equal(value, ref["initial"][name]), name  # initialized, as on one process

    assert_matches(result, config | {"build_on": "meta"}, 1)
