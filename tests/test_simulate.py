"""The simulator against step times, bubbles and memory computed by hand (pure Python, no processes)."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import replace

import pytest

from lightning_bfpp.plan.efficiency import EfficiencyCurve
from lightning_bfpp.plan.gathering import add_parameter_gathering, gathers_per_stage
from lightning_bfpp.plan.schedule import GROUP_END, Action, ActionKind, Schedule, build_schedule
from lightning_bfpp.plan.simulate import CostModel, SimEvent, estimate_memory, plot_timeline, resident_bytes, simulate
from lightning_bfpp.plan.weight_flush import add_weight_flush


def _parse(text: str) -> Action:
    """'F0.1' -> Action(FORWARD, 0, 1); '|' -> GROUP_END."""
    if text == "|":
        return GROUP_END
    kind, rest = text.rstrip("0123456789."), text.lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    stage, micro_batch = rest.split(".")
    return Action(ActionKind(kind), int(stage), int(micro_batch))


def _spans(events: tuple[SimEvent, ...]) -> dict[str, tuple[float, float]]:
    return {e.name: (e.start, e.end) for e in events}


@pytest.mark.parametrize(("pipeline_size", "micro_batches"), [(1, 3), (2, 4), (4, 8), (4, 2), (8, 3)])
def test_gpipe_step_and_bubble(pipeline_size: int, micro_batches: int) -> None:
    """GPipe, forward f = 1, backward b = 2, free communication: step = (M + P - 1)(f + b), bubble = (P-1)/(M+P-1)."""
    result = simulate(build_schedule("gpipe", pipeline_size, 1, micro_batches), CostModel(forward_time=1.0))
    assert result.step_time == pytest.approx((micro_batches + pipeline_size - 1) * 3)
    assert result.bubble_fraction == pytest.approx((pipeline_size - 1) / (micro_batches + pipeline_size - 1))
    assert result.compute_time == pytest.approx([micro_batches * 3.0] * pipeline_size)
    # every rank holds all M activations before its first backward
    assert result.memory.peak_live_micro_batches == (micro_batches,) * pipeline_size


def test_looped_breadth_first_by_hand() -> None:
    """Looped breadth-first, P = 2, L = 2, M = 4: stages 0, 2 on rank 0 and 1, 3 on rank 1; each stage is half a
    rank's work, so f = 0.5 and b = 1 per stage and micro-batch; communication is free.

    forward  rank 0: F0.0-F0.3 in [0, 2], F2.0-F2.3 in [2, 4] (F2.0 needs F1.0, done at 1)
             rank 1: F1.m in [0.5 + 0.5m, 1 + 0.5m] (ends 2.5), F3.m in [2.5 + 0.5m, 3 + 0.5m] (ends 4.5)
    backward rank 1: B3.m in [4.5 + m, 5.5 + m] (ends 8.5)
             rank 0: B2.m waits for B3.m: [5.5 + m, 6.5 + m] (ends 9.5)
             rank 1: B1.0-B1.2 in [8.5, 11.5] (free after B3.3), B1.3 in [11.5, 12.5]
             rank 0: B0.m waits for B1.m: [9.5 + m, 10.5 + m], so the step ends at 13.5
    busy: 2 ranks x L M (f + b) = 2 x 12 = 24, bubble = 1 - 24 / (2 x 13.5) = 1/9 = (P-1)/(LM + P-1);
    GPipe with the same work per rank (f = 1, b = 2) takes (M + P - 1) x 3 = 15, bubble 1/5.
    """
    result = simulate(build_schedule("breadth_first", 2, 2, 4), CostModel(forward_time=0.5))
    spans = _spans(result.events)
    assert result.step_time == pytest.approx(13.5)
    assert result.bubble_fraction == pytest.approx(1 / 9)
    assert spans["F2.0"] == (2.0, 2.5) and spans["F3.3"] == (4.0, 4.5)
    assert spans["B2.0"] == (5.5, 6.5) and spans["B1.3"] == (11.5, 12.5) and spans["B0.3"] == (12.5, 13.5)
    assert result.memory.peak_live_micro_batches == (8, 8)  # L x M: every forward precedes every backward
    gpipe = simulate(build_schedule("gpipe", 2, 1, 4), CostModel(forward_time=1.0))
    assert gpipe.step_time == pytest.approx(15.0) and gpipe.bubble_fraction == pytest.approx(1 / 5)


@pytest.mark.parametrize(("pipeline_size", "stages", "micro_batches"), [(2, 3, 4), (4, 2, 4), (4, 4, 8), (3, 2, 6)])
def test_looped_breadth_first_bubble_formula(pipeline_size: int, stages: int, micro_batches: int) -> None:
    """With M >= P and uniform stages, looping divides the GPipe bubble's fill and drain by L."""
    schedule = build_schedule("breadth_first", pipeline_size, stages, micro_batches)
    result = simulate(schedule, CostModel(forward_time=1.0 / stages))
    expected = (pipeline_size - 1) / (stages * micro_batches + pipeline_size - 1)
    assert result.bubble_fraction == pytest.approx(expected)


@pytest.mark.parametrize(("pipeline_size", "micro_batches"), [(2, 4), (4, 4), (4, 8)])
def test_one_f_one_b_peak_memory_and_time(pipeline_size: int, micro_batches: int) -> None:
    """1F1B keeps P - r activations on rank r (GPipe keeps M) and takes as long as GPipe."""
    result = simulate(build_schedule("1f1b", pipeline_size, 1, micro_batches), CostModel(forward_time=1.0))
    assert result.memory.peak_live_micro_batches == tuple(pipeline_size - r for r in range(pipeline_size))
    assert result.step_time == pytest.approx((micro_batches + pipeline_size - 1) * 3)


@pytest.mark.parametrize("pipeline_size", [2, 4])
def test_point_to_point_cost_adds_two_hops_per_boundary(pipeline_size: int) -> None:
    """GPipe with a transfer cost c = latency + bytes / bandwidth < f per hop: the first micro-batch crosses P - 1
    boundaries forward and P - 1 backward, 2 (P - 1) c. The last rank sends nothing in its forwards and the first
    nothing in its backwards, so they post all their receives before those computes: each transfer starts when its
    message is sent and hides under the sender's next compute. A middle rank (P > 2) sends after every compute, so
    its receives stay in the step their message is sent, after its own compute of that step (the order NCCL needs),
    and each of its later forwards and backwards waits for its transfer: 2 (M - 1) c more.
    step = (M + P - 1)(f + b) + 2 (P - 1) c + (2 (M - 1) c if P > 2 else 0)."""
    cost = CostModel(forward_time=1.0, p2p_latency=0.1, boundary_bytes=30.0, p2p_bandwidth=100.0)
    result = simulate(build_schedule("gpipe", pipeline_size, 1, 6), cost)
    middle = 2 * 5 * 0.4 if pipeline_size > 2 else 0.0
    assert result.step_time == pytest.approx((6 + pipeline_size - 1) * 3 + 2 * (pipeline_size - 1) * 0.4 + middle)
    sends = [e for e in result.events if e.category == "send_act"]
    assert len(sends) == (pipeline_size - 1) * 6 and all(e.end - e.start == pytest.approx(0.3) for e in sends)


def test_a_compute_waits_for_the_whole_group_of_its_input() -> None:
    """On NCCL a group of transfers completes as one: with RA1.0 and RA1.1 in one group, F1.0 waits for both
    transfers (c = 0.4 each, sent after F0.0 ends at 1 and F0.1 at 2); split by a GROUP_END marker, F1.0 starts when
    its own input arrives. Rank 0's second send starts after its first group is done."""
    forward_only = "F0.0 SA0.0 F0.1 SA0.1"
    cost = CostModel(forward_time=1.0, p2p_latency=0.1, boundary_bytes=30.0, p2p_bandwidth=100.0)
    for receiver, f10 in (("RA1.0 RA1.1 F1.0 F1.1", (2.4, 3.4)), ("RA1.0 | RA1.1 F1.0 F1.1", (1.4, 2.4))):
        actions = tuple(tuple(_parse(a) for a in text.split()) for text in (forward_only, receiver))
        result = simulate(Schedule("hand_made", 2, 1, 2, True, actions), cost)
        assert _spans(result.events)["F1.0"] == pytest.approx(f10)
        assert _spans(result.events)["F1.1"] == pytest.approx((f10[1], f10[1] + 1))


def test_all_reduce_overlaps_backward_of_the_stages_below() -> None:
    """P = 1, two stages, M = 2, f = 1, b = 2, D = 2, 1000 parameters per stage at 2 bytes, 1000 bytes/s.
    The all-reduce takes 2 (D-1)/D x 2000 / 1000 = 2. Stage 1 ends its backward at 8: its all-reduce [8, 10]
    hides under the backward of stage 0 [8, 12]; stage 0's all-reduce [12, 14] ends the step."""
    cost = CostModel(forward_time=1.0, stage_params=1000, dp_size=2, dp_bandwidth=1000.0)
    result = simulate(build_schedule("breadth_first", 1, 2, 2), cost)
    reductions = sorted((e.start, e.end) for e in result.events if e.category == "all_reduce")
    assert reductions == [(8.0, 10.0), (12.0, 14.0)]
    assert result.step_time == pytest.approx(14.0)


def test_fully_sharded_gathers_and_memory_by_hand() -> None:
    """As above with ZeRO-3: all-gather and reduce-scatter take (D-1)/D x 2000 / 1000 = 1 each.

    The runs of computes are s0's forwards, s1's forwards and backwards (one run: s1 stays gathered), s0's backwards;
    each run's gather is issued when the previous run starts computing. gather s0 [0, 1]; F0.0 [1, 2] prefetches s1:
    [1, 2]; F0.1 [2, 3]; F1.0 [3, 4] prefetches s0 for its backward: [3, 4]; F1.1 [4, 5]; B1.0 [5, 7]; B1.1 [7, 9];
    reduce-scatter s1 [9, 10]; B0.0 [9, 11], B0.1 [11, 13]; reduce-scatter s0 [13, 14]: step 14.
    Memory: resident 2000 x 16 / 2 = 16000 bytes; at B1.0 both stages are gathered (2 x 2000) and s1's unsharded
    gradients are there (2000): peak 22000.
    """
    cost = CostModel(forward_time=1.0, stage_params=1000, dp_size=2, dp_bandwidth=1000.0, sharding="full")
    result = simulate(build_schedule("breadth_first", 1, 2, 2), cost)
    gathers = sorted((e.start, e.end) for e in result.events if e.category == "all_gather")
    scatters = sorted((e.start, e.end) for e in result.events if e.category == "reduce_scatter")
    assert gathers == [(0.0, 1.0), (1.0, 2.0), (3.0, 4.0)]
    assert scatters == [(9.0, 10.0), (13.0, 14.0)]
    assert result.step_time == pytest.approx(14.0)
    assert result.memory.peak_bytes == (22000.0,)
    assert estimate_memory(build_schedule("breadth_first", 1, 2, 2), cost) == result.memory


@pytest.mark.parametrize(
    ("sharding", "expected"),
    [("none", (2000, 2000, 12000)), ("optimizer", (2000, 2000, 3000)), ("gradients", (500 + 2000, 500, 3000)),
     ("full", (500, 500, 3000))],
)  # fmt: skip
def test_resident_bytes_by_sharding_mode(sharding: str, expected: tuple[int, int, int]) -> None:
    cost = CostModel(forward_time=1.0, dp_size=4, sharding=sharding)
    assert resident_bytes(1000, cost) == expected
    assert resident_bytes(1000, CostModel(forward_time=1.0, dp_size=1, sharding=sharding)) == (2000, 2000, 12000)


def test_activation_checkpointing_time_and_memory() -> None:
    """GPipe P = 2, M = 4 with checkpointing: the backward recomputes the forward (b' = b + f = 3), ranks keep M
    stage inputs (10 bytes) and rebuild one micro-batch's activations (1000) during a backward."""
    base = {"forward_time": 1.0, "activation_bytes": 1000.0, "boundary_bytes": 10.0}
    plain = simulate(build_schedule("gpipe", 2, 1, 4), CostModel(**base))
    ckpt = simulate(build_schedule("gpipe", 2, 1, 4), CostModel(**base, activation_checkpointing=True))
    assert plain.step_time == pytest.approx(5 * 3) and ckpt.step_time == pytest.approx(5 * 4)
    assert plain.memory.peak_activation_bytes == (4000.0, 4000.0)
    assert ckpt.memory.peak_activation_bytes == (1040.0, 1040.0)


def test_batched_weight_gradients_cost_the_weight_share_in_one_action_per_run() -> None:
    """GPipe P = 2, M = 2, f = 1, b = 2 of which w = 1 computes weight gradients. Batched, each backward costs
    b - w = 1 and W<s> costs M w = 2 after the run, so the gradients travel up sooner:
    rank 1: F1.0 [1, 2], F1.1 [2, 3], B1.0 [3, 4], B1.1 [4, 5], W1 [5, 7]
    rank 0: B0.0 [4, 5] (needs SG1.0 at 4), B0.1 [5, 6], W0 [6, 8]: the step takes 8 instead of (M + P - 1) 3 = 9,
    with the same busy time."""
    schedule = build_schedule("gpipe", 2, 1, 2)
    flushed = add_weight_flush(schedule)
    plain, batched = simulate(schedule, CostModel(forward_time=1.0)), simulate(flushed, CostModel(forward_time=1.0))
    assert plain.step_time == pytest.approx(9) and batched.step_time == pytest.approx(8)  # default w = b / 2
    assert batched.compute_time == pytest.approx(plain.compute_time)
    spans = _spans(batched.events)
    assert spans["B1.1"] == (4.0, 5.0) and spans["W1"] == (5.0, 7.0) and spans["B0.0"] == (4.0, 5.0)
    assert spans["W0"] == (6.0, 8.0)
    assert {e.category for e in batched.events if e.name[0] == "W"} == {"backward_weight"}
    free = simulate(flushed, CostModel(forward_time=1.0, weight_grad_time=[0.0, 0.5]))
    assert _spans(free.events)["B1.1"] == (4.5, 6.0) and _spans(free.events)["W1"] == (6.0, 7.0)
    assert _spans(free.events)["W0"] == (8.5, 8.5) and free.step_time == pytest.approx(8.5)  # stage 0: b unchanged
    with pytest.raises(
        ValueError, match=r"weight_grad_time of stage 1 is 3.0: give a time in \[0, backward_time=2.0\]"
    ):
        simulate(flushed, CostModel(forward_time=1.0, weight_grad_time=[1.0, 3.0]))


def test_batched_weight_gradients_run_at_the_efficiency_of_the_run_and_keep_their_operands() -> None:
    """The GPipe case above with a kernel efficiency of 0.5 at one micro-batch's 100 rows and 1 at 200: W<s> is one
    product over both micro-batches' rows, M w x 0.5 / 1 = 1, so W1 [5, 6], W0 [6, 7] and the step takes 7. Memory:
    activations of 10 per micro-batch, freed by each backward, whose weight-gradient operands (15) stay until the W:
    rank peaks 2 x 15 = 30 after the run instead of 2 x 10 = 20 before it."""
    schedule = build_schedule("gpipe", 2, 1, 2)
    flushed = add_weight_flush(schedule)
    curve = EfficiencyCurve(((100.0, 0.5), (200.0, 1.0)))
    cost = CostModel(forward_time=1.0, activation_bytes=10.0, weight_grad_bytes=15.0)
    batched = simulate(flushed, replace(cost, efficiency=curve, weight_grad_rows=100.0))
    assert _spans(batched.events)["W1"] == (5.0, 6.0) and _spans(batched.events)["W0"] == (6.0, 7.0)
    assert batched.step_time == pytest.approx(7)
    assert simulate(flushed, cost).step_time == pytest.approx(8)  # no curve: M w = 2, as above
    assert batched.memory.peak_bytes == (30.0, 30.0)
    assert simulate(schedule, cost).memory.peak_bytes == (20.0, 20.0)  # no W: nothing is kept


def test_depth_first_holds_fewer_activations_than_breadth_first() -> None:
    schedule = {name: build_schedule(name, 4, 2, 8) for name in ("breadth_first", "depth_first")}
    cost = CostModel(forward_time=0.5, activation_bytes=1.0)
    live = {name: simulate(s, cost).memory.peak_live_micro_batches for name, s in schedule.items()}
    assert live["breadth_first"] == (16, 16, 16, 16)
    assert max(live["depth_first"]) < 16


@pytest.mark.parametrize(
    ("name", "sizes"),
    [("breadth_first", (3, 2, 5)), ("depth_first", (4, 2, 8)), ("depth_first", (3, 1, 5)), ("gpipe", (4, 1, 3)),
     ("1f1b", (4, 1, 6)), ("breadth_first", (1, 3, 2))],
)  # fmt: skip
def test_every_dependency_and_rank_order_is_respected(name: str, sizes: tuple[int, int, int]) -> None:
    """Uneven stages and slow links: each rank's computes follow its action order without overlap, a forward starts
    after the previous stage's forward (plus the transfer), a backward after the next stage's backward."""
    num_stages = sizes[0] * sizes[1]
    cost = CostModel(
        forward_time=[1.0 + 0.3 * (s % 3) for s in range(num_stages)],
        p2p_latency=0.2,
        boundary_bytes=50.0,
        p2p_bandwidth=100.0,
        stage_params=100.0,
        dp_size=2,
        dp_bandwidth=50.0,
        sharding="full",
    )
    schedule = build_schedule(name, *sizes)
    result = simulate(schedule, cost)
    spans = _spans(result.events)
    for rank, actions in enumerate(schedule.actions):
        computes = [spans[str(a)] for a in actions if a.kind.value in ("F", "B")]
        assert len(computes) == 2 * sizes[1] * sizes[2]
        assert all(a[1] <= b[0] + 1e-9 for a, b in itertools.pairwise(computes)), f"rank {rank}"
    hop = 0.0 if sizes[0] == 1 else 0.2 + 0.5
    for s in range(num_stages):
        for m in range(sizes[2]):
            assert spans[f"F{s}.{m}"][1] <= spans[f"B{s}.{m}"][0] + 1e-9
            if s > 0:
                assert spans[f"F{s - 1}.{m}"][1] + hop <= spans[f"F{s}.{m}"][0] + 1e-9
            if s < num_stages - 1:
                assert spans[f"B{s + 1}.{m}"][1] + hop <= spans[f"B{s}.{m}"][0] + 1e-9
    assert result.step_time >= max(e.end for e in result.events) - 1e-9


def test_forward_only_keeps_no_activations() -> None:
    schedule = build_schedule("breadth_first", 2, 2, 4, forward_only=True)
    result = simulate(schedule, CostModel(forward_time=0.5, activation_bytes=3.0, dp_size=2, sharding="optimizer"))
    assert result.memory.peak_live_micro_batches == (1, 1) and result.memory.peak_activation_bytes == (3.0, 3.0)
    assert not [e for e in result.events if e.category == "all_gather"]  # no optimizer step to gather after
    assert result.step_time == pytest.approx(4.5)


def test_cost_model_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="one of none, optimizer, gradients, full"):
        CostModel(forward_time=1.0, sharding="zero3")
    with pytest.raises(ValueError, match="exactly 4"):
        simulate(build_schedule("breadth_first", 2, 2, 2), CostModel(forward_time=[1.0, 2.0]))
    with pytest.raises(ValueError, match="dp_size"):
        CostModel(forward_time=1.0, dp_size=0)


def test_per_rank_bubble_and_free_everything() -> None:
    result = simulate(build_schedule("gpipe", 2, 1, 2), CostModel(forward_time=1.0, dp_bandwidth=math.inf))
    assert result.rank_bubble_fractions == pytest.approx((1 / 3, 1 / 3))


def test_plot_timeline_writes_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    cost = CostModel(forward_time=0.5, stage_params=1000, dp_size=2, dp_bandwidth=1000.0, sharding="full")
    result = simulate(build_schedule("breadth_first", 2, 2, 4), cost)
    path = plot_timeline(result.events, tmp_path / "timeline.png", "P=2 L=2 M=4")
    assert path.stat().st_size > 10_000


def test_fully_sharded_gathers_follow_the_executed_schedule() -> None:
    """The simulator gathers a stage exactly where the executor does (gathering.py): once per run of computes."""
    cost = CostModel(forward_time=1.0, stage_params=1000, dp_size=2, dp_bandwidth=1000.0, sharding="full")
    for name in ("breadth_first", "depth_first"):
        schedule = build_schedule(name, 2, 2, 4)
        simulated = Counter(
            int(e.name.split()[-1]) for e in simulate(schedule, cost).events if e.category == "all_gather"
        )
        assert simulated == gathers_per_stage(add_parameter_gathering(schedule)), name


def test_host_time_per_action_blocking_and_queued_ahead() -> None:
    """One rank, M = 4 (f = 1, b = 2; 8 computes and the gradient reduction, no transfers): a blocking host adds its
    time to each of the 9 actions (12 + 9 h); a host that queues ahead only delays the first kernel while h < the
    kernels, and bounds the step once h exceeds them (9 issues of h = 5: 45)."""
    schedule = build_schedule("gpipe", 1, 1, 4)
    assert simulate(schedule, CostModel(forward_time=1.0, host_time=0.25)).step_time == pytest.approx(14.25)
    ahead = CostModel(forward_time=1.0, host_time=0.25, host_blocking=False)
    assert simulate(schedule, ahead).step_time == pytest.approx(12.25)
    slow_host = replace(ahead, host_time=5.0)
    assert simulate(schedule, slow_host).step_time == pytest.approx(45.0)
    with pytest.raises(ValueError, match="host_time must be >= 0"):
        CostModel(forward_time=1.0, host_time=-1e-6)


def test_host_time_counts_every_action_of_a_pipelined_rank() -> None:
    """P = 2, L = 2, M = 4 breadth-first with transfers: rank 0 issues 32 actions (16 computes, 16 transfers and
    receive posts); a blocking host makes the step at least that many host times longer than the free-host step."""
    schedule = build_schedule("breadth_first", 2, 2, 4)
    free = simulate(schedule, CostModel(forward_time=0.5)).step_time
    charged = simulate(schedule, CostModel(forward_time=0.5, host_time=0.01)).step_time
    issued = len([a for a in schedule.actions[0] if a != GROUP_END])
    assert issued >= 32
    assert charged >= free + issued * 0.01 - 1e-9
    assert charged <= free + 2 * issued * 0.01  # both ranks' host time, at most, on the critical path
