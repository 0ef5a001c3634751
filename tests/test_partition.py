"""Layers to stages: the three partition methods, looped placement, and global parameter names."""

from __future__ import annotations

import itertools

import pytest
import torch
from models import StackModel
from torch import nn

from lightning_bfpp.plan.partition import PartitionError, balanced_boundaries, build_partition
from lightning_bfpp.run.microbatch import split_batch
from lightning_bfpp.run.split import RemoteLayer, drop_remote_layers, layer_names


def test_uniform_gives_extra_layers_to_the_first_stages() -> None:
    layers = [nn.Linear(2, 2) for _ in range(7)]
    partition = build_partition(layers, pipeline_size=2, stages_per_rank=2)
    assert partition.boundaries == (0, 2, 4, 6, 7)
    assert [partition.rank_of(s) for s in range(4)] == [0, 1, 0, 1]
    assert partition.stages_of(1) == [1, 3]


def test_parameters_balances_the_largest_stage() -> None:
    costs = [10, 1, 1, 1, 1, 10]
    bounds = balanced_boundaries(costs, 3)
    sums = [sum(costs[a:b]) for a, b in itertools.pairwise(bounds)]
    assert sums == [10, 4, 10]
    assert len(sums) == 3 and bounds[0] == 0 and bounds[-1] == len(costs)
    model = StackModel(num_blocks=4, wide_blocks=(0,))
    partition = build_partition(model.pipeline_layers(), 2, 1, "parameters")
    assert partition.boundaries != (0, 3, 6)  # the wide block moves the cut away from the uniform one


def test_explicit_and_errors_name_the_fix() -> None:
    layers = [nn.Linear(2, 2) for _ in range(4)]
    assert build_partition(layers, 2, 1, "explicit", [0, 1, 4]).boundaries == (0, 1, 4)
    with pytest.raises(PartitionError, match=r"e\.g\. \[0, 2, 4\]"):
        build_partition(layers, 2, 1, "explicit", [0, 3])
    with pytest.raises(PartitionError, match="at most 4 stages"):
        build_partition(layers, 4, 2)
    with pytest.raises(PartitionError, match="choose one of"):
        build_partition(layers, 2, 1, "random")


def test_remote_layers_keep_global_names() -> None:
    model = StackModel(num_blocks=4)
    names = layer_names(model, model.pipeline_layers())
    assert names == ["first", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    partition = build_partition(model.pipeline_layers(), 2, 1)
    drop_remote_layers(model, names, partition, rank=1)
    assert isinstance(model.first, RemoteLayer)
    assert sorted(model.state_dict()) == ["blocks.2.linear.bias", "blocks.2.linear.weight", "blocks.3.linear.bias",
                                          "blocks.3.linear.weight", "head.bias", "head.weight"]  # fmt: skip


def test_parameters_outside_the_stack_are_rejected() -> None:
    model = StackModel(num_blocks=2)
    model.stray = nn.Linear(2, 2)
    with pytest.raises(PartitionError, match=r"stray\.weight"):
        layer_names(model, model.pipeline_layers())


def test_split_batch_splits_batch_dimension_and_shares_the_rest() -> None:
    batch = {"x": torch.arange(12).reshape(6, 2), "mask": torch.ones(3, 3), "name": "b", "pair": (torch.arange(6),)}
    parts = split_batch(batch, 3)
    assert [p["x"].tolist() for p in parts] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10, 11]]]
    assert all(p["mask"] is batch["mask"] and p["name"] == "b" for p in parts)
    assert parts[2]["pair"][0].tolist() == [4, 5]
    with pytest.raises(ValueError, match="multiple of 4"):
        split_batch(batch, 4)
