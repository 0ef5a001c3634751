"""Memory-bounded breadth-first (``breadth_first_micro_batches``): configured, checked, and training as one process.

The schedule itself (order, live activations, reductions) is tested in test_schedule.py.
"""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from test_config import compose_cfg
from test_equivalence import assert_matches

from lightning_bfpp import BFPPStrategy
from lightning_bfpp.plan.schedule import build_schedule
from lightning_bfpp.plan.simulate import CostModel, simulate
from lightning_bfpp.run.pipeline import step_schedule


def test_grouped_training_matches_one_process_with_nccl_stream_order(run_job) -> None:
    config = {
        "devices": 2,
        "strategy": {
            "pipeline_parallel_size": 2,
            "stages_per_rank": 2,
            "micro_batches": 4,
            "breadth_first_micro_batches": 2,
        },
        "model": {"num_blocks": 4, "optimizer": "adam"},
        "batch_size": 8,
        "max_steps": 3,
        "emulate_nccl_streams": "rank",  # NCCL's transfer order and rendezvous, emulated over gloo
    }
    assert_matches(run_job(config, timeout=150), config, 1)


@pytest.mark.parametrize(
    "sharding, weight_gradients",
    [
        ("full", "per_micro_batch"),  # ZeRO-3: parameters gathered per run of each group
        ("optimizer", "batched"),  # ZeRO-1: weight gradients batched over each group's run of backwards
    ],
)
def test_memory_tools_together_with_sharding_match_one_process(run_job, sharding: str, weight_gradients: str) -> None:
    """P=2 x D=2, groups of 2 micro-batches, every layer recomputed in backward."""
    config = {
        "devices": 4,
        "strategy": {
            "pipeline_parallel_size": 2,
            "stages_per_rank": 2,
            "micro_batches": 4,
            "breadth_first_micro_batches": 2,
            "activation_checkpointing": "layer",
            "sharding": sharding,
            "weight_gradients": weight_gradients,
        },
        "model": {"num_blocks": 4, "optimizer": "adam"},
        "batch_size": 8,
        "max_steps": 2,
    }
    result = run_job(config, timeout=180)
    assert all((rank["batched_linears"] > 0) == (weight_gradients == "batched") for rank in result.ranks())
    assert_matches(result, config, 2)


def test_group_size_must_divide_the_micro_batches() -> None:
    with pytest.raises(ValueError, match=r"breadth_first_micro_batches=3 must divide .* \(4\).*use one of 1, 2, 4"):
        BFPPStrategy(micro_batches=4, breadth_first_micro_batches=3)
    with pytest.raises(ValueError, match="schedule='breadth_first'"):
        BFPPStrategy(schedule="depth_first", micro_batches=4, breadth_first_micro_batches=2)


def test_training_runs_the_grouped_schedule_and_evaluation_the_plain_one() -> None:
    strategy = BFPPStrategy(pipeline_parallel_size=2, stages_per_rank=2, micro_batches=4, breadth_first_micro_batches=2)
    grouped = build_schedule("breadth_first", 2, 2, 4, breadth_first_micro_batches=2)
    assert grouped != build_schedule("breadth_first", 2, 2, 4)
    assert step_schedule(strategy.options, 2, 4) == grouped
    assert step_schedule(strategy.options, 2, 3, forward_only=True) == build_schedule(
        "breadth_first", 2, 2, 3, forward_only=True
    )


def test_hydra_schedule_group_sets_the_group_size() -> None:
    cfg = compose_cfg("schedule=breadth_first_grouped")
    assert cfg.strategy.schedule == "breadth_first" and cfg.strategy.breadth_first_micro_batches == 2
    strategy = instantiate(cfg.strategy, _convert_="all")
    assert strategy.breadth_first_micro_batches == 2
    assert compose_cfg().strategy.breadth_first_micro_batches is None


def test_simulator_shows_the_trade() -> None:
    """Smaller groups keep fewer activations and take longer (a pipeline fill and drain per group): P=4, L=2, M=8,
    forward 1 and backward 2 per stage and micro-batch, free communication."""
    cost = CostModel(forward_time=1.0, activation_bytes=1.0)
    results = [
        simulate(build_schedule("breadth_first", 4, 2, 8, breadth_first_micro_batches=g), cost, record_events=False)
        for g in (8, 4, 2, 1)
    ]
    assert [r.memory.peak_live_micro_batches for r in results] == [(2 * g,) * 4 for g in (8, 4, 2, 1)]
    assert [r.step_time for r in results] == [57.0, 66.0, 108.0, 192.0]  # the figures docs/guide/memory.md quotes
