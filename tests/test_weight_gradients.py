"""Batched weight gradients (``weight_gradients="batched"``): the same training as one process, one product per run."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
import torch
from test_config import compose_cfg
from test_equivalence import assert_matches
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_bfpp import BFPPStrategy
from lightning_bfpp.plan.schedule import Action, ActionKind, Schedule, ScheduleError, build_schedule, validate_schedule
from lightning_bfpp.plan.stream_order import validate_stream_order
from lightning_bfpp.plan.weight_flush import add_weight_flush, validate_weight_flush
from lightning_bfpp.run.executor import PipelineExecutor
from lightning_bfpp.run.weight_grad import WeightGradientBatcher


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _stack(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 5, bias=False)).double()


def _backwards(model: nn.Module, parts: list[torch.Tensor]) -> None:
    for x in parts:
        model(x).square().mean().backward()


def test_one_weight_product_per_linear_and_run_with_the_gradients_of_every_micro_batch() -> None:
    plain, batched = _stack(), _stack()
    parts = list(torch.randn(4, 3, 6, dtype=torch.float64))  # 4 micro-batches of 3 rows
    _backwards(plain, parts)
    batcher = WeightGradientBatcher({0: [batched]})
    assert batcher.num_layers == 2
    counter = _CountMatmuls()
    with counter:
        _backwards(batched, parts)
    first, last = batched[0], batched[2]
    assert first.weight.grad is None and last.weight.grad is None  # nothing computed before the run ends
    assert first.bias.grad is not None  # bias gradients stay per micro-batch (a sum, no product)
    backward_matmuls = counter.calls - 2 * len(parts)  # minus one product per Linear forward
    assert backward_matmuls == len(parts)  # input gradients only; the first Linear's input needs none
    with counter:
        batcher.flush(0)
    assert counter.calls - 3 * len(parts) == 2  # one weight product per Linear for the whole run
    for p, q in zip(plain.parameters(), batched.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-14)
    batcher.flush(0)  # nothing left: a second flush adds nothing
    torch.testing.assert_close(last.weight.grad, plain[2].weight.grad, rtol=1e-12, atol=1e-14)
    batcher.remove()
    assert "forward" not in first.__dict__
    batched.zero_grad(set_to_none=True)
    _backwards(batched, parts[:1])
    assert first.weight.grad is not None  # plain autograd again


def test_three_dimensional_inputs_evaluation_and_autocast() -> None:
    plain, batched = _stack(), _stack()
    batcher = WeightGradientBatcher({0: [batched]})
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)  # micro-batch, sequence, features
    _backwards(plain, list(x))
    _backwards(batched, list(x))
    batcher.flush(0)
    for p, q in zip(plain.parameters(), batched.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        torch.testing.assert_close(batched(x[0]), plain(x[0]), rtol=0, atol=0)
    plain, batched = plain.float(), batched.float()
    for model in (plain, batched):
        model.zero_grad(set_to_none=True)
        for part in x.float():
            with torch.autocast("cpu", dtype=torch.bfloat16):  # the forward only, as Lightning's loop runs it
                out = model[0](part)
                loss = model[2](model[1](out)).square().mean()
            assert out.dtype == torch.bfloat16
            loss.backward()
    batcher.flush(0)
    for p, q in zip(plain.parameters(), batched.parameters(), strict=True):
        assert q.grad.dtype == torch.float32
        torch.testing.assert_close(q.grad, p.grad, rtol=2e-2, atol=2e-2)
    batcher.remove()


_W, _B = ActionKind.BACKWARD_WEIGHT, ActionKind.BACKWARD


@pytest.mark.parametrize(
    "schedule_name, groups", [("breadth_first", None), ("breadth_first", 2), ("depth_first", None)]
)
def test_flushes_follow_the_last_backward_of_each_run_and_its_send(schedule_name: str, groups: int | None) -> None:
    plain = build_schedule(schedule_name, 2, 2, 4, breadth_first_micro_batches=groups)
    schedule = add_weight_flush(plain)
    assert add_weight_flush(schedule) == schedule  # applied twice: the same flushes
    validate_stream_order(schedule)  # a local compute: the order of the transfers cannot hang on NCCL
    for rank in range(2):
        actions = schedule.actions[rank]
        assert [a for a in actions if a.kind is not _W] == list(plain.actions[rank])  # only flushes are added
        per_stage: dict[int, int] = {}
        for position, flush in ((i, a) for i, a in enumerate(actions) if a.kind is _W):
            stage = flush.stage
            per_stage[stage] = per_stage.get(stage, 0) + 1
            before = [a for a in actions[:position] if a.stage == stage and a.kind is _B]
            assert before, f"flush of stage {stage} before any of its backwards"
            if position + 1 < len(actions):  # else at the end of the step
                following = actions[position + 1].kind
                assert following in (ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.REDUCE_GRAD)
            if stage > 0:  # the send of the input gradient of the run's last backward goes first
                assert any(
                    a.kind is ActionKind.SEND_GRAD and a.stage == stage and a.micro_batch == before[-1].micro_batch
                    for a in actions[:position]
                )
            if before[-1] == [a for a in actions if a.kind is _B and a.stage == stage][-1]:  # the stage's last run
                assert position < actions.index(Action(ActionKind.REDUCE_GRAD, stage))
        computes = [a for a in actions if a.kind in (ActionKind.FORWARD, ActionKind.BACKWARD)]
        backward_runs: dict[int, int] = {}
        for previous, action in zip([None, *computes[:-1]], computes, strict=True):
            starts_run = previous is None or (previous.kind, previous.stage) != (action.kind, action.stage)
            if action.kind is ActionKind.BACKWARD and starts_run:
                backward_runs[action.stage] = backward_runs.get(action.stage, 0) + 1
        assert per_stage == backward_runs  # one flush per run of backwards, none in between
        if schedule_name == "breadth_first":  # one run per local stage and group of micro-batches
            assert sum(backward_runs.values()) == 2 * (4 // (groups or 4))
        else:  # interleaved: the backwards of a stage come in several runs
            assert sum(backward_runs.values()) > 2
    forward_only = build_schedule(schedule_name, 2, 2, 4, forward_only=True)
    assert add_weight_flush(forward_only) == forward_only


def _edited(schedule: Schedule, action: Action, after: Action | None = None) -> Schedule:
    """``schedule`` without the first ``action`` of its rank, put back right after ``after`` if given."""
    ranks = []
    for actions in map(list, schedule.actions):
        if action in actions:
            del actions[actions.index(action)]
        if after is not None and after in actions:
            actions.insert(actions.index(after) + 1, action)
        ranks.append(tuple(actions))
    return replace(schedule, actions=tuple(ranks))


def test_a_missing_or_misplaced_flush_is_rejected_naming_the_stage() -> None:
    schedule = add_weight_flush(build_schedule("breadth_first", 2, 2, 4, breadth_first_micro_batches=2))
    validate_schedule(schedule)  # the other checks accept the flushes
    cases = [  # (edit, what the error says)
        (
            _edited(schedule, Action(_W, 3)),
            r"stage 3 needs a BACKWARD_WEIGHT \(W3\) between its backward B3.1 .* and B1.0",
        ),
        (
            _edited(schedule, Action(_W, 0)),
            r"stage 0 needs a BACKWARD_WEIGHT \(W0\) between its backward B0.1 .* and F0.2",
        ),
        (
            _edited(_edited(schedule, Action(_W, 2)), Action(_W, 2)),  # both flushes of the stage gone
            r"stage 2 needs a BACKWARD_WEIGHT \(W2\) between its backward B2.3 .* and RD2 .*: its reduction would miss",
        ),
        (
            _edited(_edited(_edited(schedule, Action(_W, 1)), Action(_W, 1)), Action(ActionKind.REDUCE_GRAD, 1)),
            r"stage 1 .* after its backward B1.3 .*: the step ends",
        ),
        (_edited(schedule, Action(_W, 0), Action(ActionKind.FORWARD, 0, 0)), r"W0\): stage 0 has no backward to flush"),
        (_edited(schedule, Action(_W, 1), Action(_W, 0)), r"W1\): must name a stage of rank 0"),
    ]
    for edited, message in cases:
        with pytest.raises(ScheduleError, match=message):
            validate_weight_flush(edited)
    plain = build_schedule("breadth_first", 2, 2, 4)
    with pytest.raises(ScheduleError, match=r"stage 0 needs a BACKWARD_WEIGHT"):  # refused before any transfer
        PipelineExecutor(plain, 0, None, weight_gradients=WeightGradientBatcher({}))


def test_training_matches_one_process_with_accumulation_and_clipping(run_job, tmp_path) -> None:
    config = {
        "devices": 2,
        "strategy": {
            "pipeline_parallel_size": 2,
            "stages_per_rank": 2,
            "micro_batches": 4,
            "weight_gradients": "batched",
        },
        "model": {"num_blocks": 4, "optimizer": "adam", "wide_blocks": [0, 1]},
        "batch_size": 8,
        "accumulate": 2,
        "clip_val": 0.05,
        "max_steps": 2,
        "timeline_dir": str(tmp_path / "timeline"),
    }
    result = run_job(config, timeout=150)
    assert all(rank["batched_linears"] > 0 for rank in result.ranks())  # the option reached every rank's layers
    assert_matches(result, config, 1)
    trace = json.loads((tmp_path / "timeline" / "timeline.json").read_text())["traceEvents"]
    flushes = Counter((e["tid"], e["name"]) for e in trace if e.get("cat") == "backward_weight")
    assert flushes == {(r, f"W{s}"): 2 for r in (0, 1) for s in (r, r + 2)}  # one per stage and recorded batch


@pytest.mark.parametrize("sharding", ["gradients", "full"])
def test_fsdp_sharding_is_refused_with_what_to_change(sharding: str) -> None:
    with pytest.raises(ValueError, match=r"weight_gradients='batched' does not work with sharding=.*Use"):
        BFPPStrategy(sharding=sharding, weight_gradients="batched")
    with pytest.raises(ValueError, match="weight_gradients='rows' is not supported: choose one of"):
        BFPPStrategy(weight_gradients="rows")


def test_hydra_override_selects_it() -> None:
    cfg = compose_cfg("strategy.weight_gradients=batched")
    assert cfg.strategy.weight_gradients == "batched"
