"""The whole-model summary of a split module equals Lightning's summary of the unsplit module (in-process; the
printed tables under multi-process runs are checked in test_equivalence.py and test_sharding.py)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelSummary as ModelSummaryCallback
from lightning.pytorch.utilities.model_summary import summarize
from models import MetaStackModel, StackModel

from lightning_bfpp.lightning.summary import PipelineSummary, record_whole_model, use_whole_model_summary
from lightning_bfpp.plan.partition import build_partition
from lightning_bfpp.run.split import drop_remote_layers, layer_names


def split(model: StackModel, rank: int, pipeline_size: int = 2, stages_per_rank: int = 2) -> StackModel:
    """``model`` as pipeline rank ``rank`` holds it after set-up: sizes recorded, remote layers dropped."""
    layers = model.pipeline_layers()
    names = layer_names(model, layers)
    partition = build_partition(layers, pipeline_size, stages_per_rank)
    record_whole_model(model, names, partition)
    drop_remote_layers(model, names, partition, rank)
    return model


@pytest.mark.parametrize("max_depth", [-1, 0, 1, 2])
@pytest.mark.parametrize("rank", [0, 1])
def test_split_module_summarized_as_the_whole(rank: int, max_depth: int) -> None:
    """Tied weights (counted once in the totals, in both holding layers' rows), a frozen layer (non-trainable) and
    nested modules: every row and total equals Lightning's summary of the unsplit module, on either rank."""
    kwargs = {"num_blocks": 4, "tied": True, "wide_blocks": (2,)}
    whole, model = StackModel(**kwargs), StackModel(**kwargs)
    for module in (whole, model):
        module.blocks[1].requires_grad_(False)
    one_process = summarize(whole, max_depth=max_depth)
    summary = PipelineSummary(split(model, rank), max_depth=max_depth)
    assert summary.layer_names == one_process.layer_names
    assert summary.layer_types == one_process.layer_types
    assert summary.param_nums == one_process.param_nums
    assert (summary.total_parameters, summary.trainable_parameters) == (
        one_process.total_parameters,
        one_process.trainable_parameters,
    )
    assert summary.trainable_parameters < summary.total_parameters
    assert summary.total_training_modes == one_process.total_training_modes
    assert summary.model_size == one_process.model_size
    assert "RemoteLayer" not in str(summary)


def test_columns_name_pipeline_rank_and_stage() -> None:
    """Each row names the pipeline rank(s) and stage(s) holding it; with an ``example_input_array`` the summary runs
    no forward (the layers of other ranks are not here): sizes unknown."""
    model = split(StackModel(num_blocks=4), rank=1)
    model.example_input_array = ({"x": torch.zeros(2, 4, dtype=torch.float64)},)  # forward(batch)
    data = dict(PipelineSummary(model, max_depth=2)._get_summary_data())
    assert set(data["In sizes"]) == set(data["Out sizes"]) == {"?"}
    rows = list(zip(data["Name"], data["Pipeline rank"], data["Stage"], strict=True))
    assert rows == [
        ("first", "0", "0"),
        ("blocks", "0-1", "0-2"),
        ("blocks.0", "0", "0"),
        ("blocks.1", "1", "1"),
        ("blocks.2", "1", "1"),
        ("blocks.3", "0", "2"),
        ("head", "1", "3"),
    ]


def test_meta_module_counts_and_first_record_kept() -> None:
    """Sizes of layers still on the meta device count; a module split again keeps the sizes of its first split."""
    model = split(MetaStackModel(num_blocks=4), rank=0)
    expected = summarize(StackModel(num_blocks=4), max_depth=-1).total_parameters
    assert PipelineSummary(model, max_depth=-1).total_parameters == expected
    split(model, rank=0)  # the remote layers are gone now: recording again would count rank 0's layers only
    assert PipelineSummary(model, max_depth=-1).total_parameters == expected


def test_callback_keeps_lightnings_summary_for_other_modules() -> None:
    callback = ModelSummaryCallback(max_depth=-1)
    use_whole_model_summary([callback])
    plain = callback._summary(None, StackModel(num_blocks=2))  # type: ignore[arg-type]
    assert type(plain).__name__ == "ModelSummary"
    assert isinstance(callback._summary(None, split(StackModel(num_blocks=4), rank=0)), PipelineSummary)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="was not set up by BFPPStrategy"):
        PipelineSummary(StackModel(num_blocks=2))
