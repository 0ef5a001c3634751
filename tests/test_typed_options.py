"""The options' choices are types (``Literal``): LightningCLI and Hydra list them and refuse another value when they
parse it; torch's schedule names are accepted; the strategy's attributes are its keyword options (in-process)."""

from __future__ import annotations

import dataclasses
import typing
import warnings

import pytest
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

from lightning_bfpp import BFPPStrategy
from lightning_bfpp.options import SCHEDULE_ALIASES, PipelineOptions, option_names
from lightning_bfpp.plan.partition import PARTITIONS
from lightning_bfpp.plan.schedule import SCHEDULES
from lightning_bfpp.plan.specs import RANK_LAYOUTS
from lightning_bfpp.run.nonfinite import NONFINITE_POLICIES
from lightning_bfpp.run.recompute import ACTIVATION_CHECKPOINTING
from lightning_bfpp.run.sharding import SHARDING_MODES
from lightning_bfpp.run.weight_grad import WEIGHT_GRADIENTS

RUNTIME_CHOICES = {
    "schedule": (*SCHEDULES, *SCHEDULE_ALIASES),
    "partition": PARTITIONS,
    "rank_layout": RANK_LAYOUTS,
    "sharding": SHARDING_MODES,
    "activation_checkpointing": ACTIVATION_CHECKPOINTING,
    "weight_gradients": WEIGHT_GRADIENTS,
    "nonfinite_loss": NONFINITE_POLICIES,
}


def test_the_literal_types_are_the_runtime_choices() -> None:
    hints = typing.get_type_hints(PipelineOptions)
    literal = {name: typing.get_args(hint) for name, hint in hints.items() if typing.get_origin(hint) is typing.Literal}
    assert literal == {name: tuple(choices) for name, choices in RUNTIME_CHOICES.items()}


@pytest.mark.parametrize(("alias", "name"), [*SCHEDULE_ALIASES.items(), ("loopedbfs", "breadth_first")])
def test_torch_schedule_names_are_accepted(alias: str, name: str) -> None:
    assert PipelineOptions(schedule=alias).schedule == name
    assert BFPPStrategy(schedule=alias).schedule == name


def test_the_strategy_attributes_are_the_keyword_options() -> None:
    """``strategy.<option>`` is the option given to the constructor (the sizes ``P``, ``M`` and the backend: their
    resolved values), before set-up too."""
    values = dict(
        pipeline_parallel_size=2,
        stages_per_rank=2,
        micro_batches=4,
        schedule="Interleaved1F1B",
        partition="explicit",
        partition_boundaries=(0, 1, 2, 3, 4),
        rank_layout="pp_contiguous",
        sharding="optimizer",
        activation_checkpointing="layer",
        breadth_first_micro_batches=None,
        weight_gradients="batched",
        process_group_backend="gloo",
        timeout=60,
        nonfinite_loss="skip",
        timeline_dir="timeline",
        timeline_batches=(1, 2),
        save_distributed_checkpoint=False,
    )
    assert set(values) == set(option_names())
    strategy = BFPPStrategy(**values)
    for name in option_names():
        assert getattr(strategy, name) == getattr(strategy.options, name), name
    assert (strategy.schedule, strategy.partition, strategy.stage_partition) == ("depth_first", "explicit", None)
    assert dataclasses.replace(strategy.options) == strategy.options


def test_bfpp_on_one_pipeline_rank_warns_to_use_ddp() -> None:
    strategy = BFPPStrategy(pipeline_parallel_size=1, cluster_environment=LightningEnvironment())
    with pytest.warns(UserWarning, match=r"pipeline_parallel_size=1: no pipeline.*Use strategy='ddp' \(or 'fsdp'"):
        strategy._warn_without_pipeline()
    with_pipeline = BFPPStrategy(pipeline_parallel_size=2, cluster_environment=LightningEnvironment())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_pipeline._warn_without_pipeline()  # no warning


def test_lightning_cli_lists_the_choices_and_refuses_a_bad_one(capsys) -> None:
    def parse(*args: str) -> LightningCLI:
        strategy = "--trainer.strategy=lightning_bfpp.BFPPStrategy"
        return LightningCLI(BoringModel, BoringDataModule, run=False, args=[strategy, *args])

    with pytest.raises(SystemExit):
        parse("--trainer.strategy.help", "lightning_bfpp.BFPPStrategy")
    shown = capsys.readouterr().out
    choices = "{breadth_first,depth_first,gpipe,1f1b,LoopedBFS,Interleaved1F1B,GPipe,1F1B}"
    assert f"--trainer.strategy.schedule {choices}" in shown, shown
    assert "--trainer.strategy.sharding {none,optimizer,gradients,full}" in shown, shown

    with pytest.raises(SystemExit):  # refused while parsing, before anything is built
        parse("--trainer.strategy.schedule=looped")
    error = capsys.readouterr().err
    # jsonargparse 4.41 words the refusal of a string Literal "Cannot take a Union of no types" (its own bug)
    assert 'Parser key "schedule"' in error, error

    cli = parse("--trainer.strategy.schedule=LoopedBFS", "--trainer.strategy.pipeline_parallel_size=2")
    assert isinstance(cli.trainer.strategy, BFPPStrategy) and cli.trainer.strategy.schedule == "breadth_first"
