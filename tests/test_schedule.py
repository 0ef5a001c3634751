"""Tests of the pure-Python pipeline schedules (no processes, no torch)."""

from __future__ import annotations

import gc
import itertools
import re
from dataclasses import replace

import pytest

from lightning_bfpp.plan.schedule import (
    GROUP_END,
    SCHEDULES,
    Action,
    ActionKind,
    Schedule,
    ScheduleError,
    _with_early_receives,
    breadth_first,
    build_schedule,
    communication_groups,
    depth_first,
    gpipe,
    one_f_one_b,
    simulate_order,
    stage_rank,
    validate_schedule,
)
from lightning_bfpp.plan.stream_order import check_stream_order, validate_stream_order

F, B, RD = ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.REDUCE_GRAD
COMM = {ActionKind.RECV_ACT, ActionKind.SEND_ACT, ActionKind.RECV_GRAD, ActionKind.SEND_GRAD}

LOOPED_GRID = [(1, 1, 1), (1, 2, 3), (2, 1, 1), (2, 3, 5), (3, 1, 1), (3, 2, 2), (4, 2, 8), (4, 3, 7), (2, 2, 4)]
ONE_STAGE_GRID = [(1, 1, 1), (1, 1, 4), (2, 1, 1), (2, 1, 3), (3, 1, 1), (3, 1, 5), (4, 1, 3), (4, 1, 8)]
DEPTH_FIRST_GRID = [*ONE_STAGE_GRID, (1, 2, 3), (2, 2, 4), (2, 3, 2), (3, 2, 6), (4, 2, 8), (4, 4, 4), (4, 2, 12)]
SUPPORTED = (
    [("breadth_first", *g) for g in LOOPED_GRID + ONE_STAGE_GRID]
    + [("gpipe", *g) for g in ONE_STAGE_GRID]
    + [("1f1b", *g) for g in ONE_STAGE_GRID]
    + [("depth_first", *g) for g in DEPTH_FIRST_GRID]
)


def parse(text: str) -> Action:
    """'F3.1' -> Action(FORWARD, 3, 1); 'RD5' -> Action(REDUCE_GRAD, 5); '|' -> GROUP_END."""
    if text == "|":
        return GROUP_END
    match = re.fullmatch(r"([A-Z]+)(\d+)(?:\.(\d+))?", text)
    assert match, text
    kind, stage, micro_batch = match.groups()
    return Action(ActionKind(kind), int(stage), -1 if micro_batch is None else int(micro_batch))


def make(ranks: list[str], stages_per_rank: int = 1, num_micro_batches: int = 1, forward_only: bool = False):
    actions = tuple(tuple(parse(a) for a in line.split()) for line in ranks)
    return Schedule("hand_made", len(ranks), stages_per_rank, num_micro_batches, forward_only, actions)


def computes(actions: tuple[Action, ...], kind: ActionKind | None = None) -> list[Action]:
    return [a for a in actions if a.kind in ((kind,) if kind else (F, B))]


def line(actions: list[Action]) -> str:
    return " ".join(map(str, actions))


# building and validating -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,p,spr,m", SUPPORTED)
@pytest.mark.parametrize("forward_only", [False, True])
def test_supported_schedules_build_and_validate(name: str, p: int, spr: int, m: int, forward_only: bool) -> None:
    schedule = build_schedule(name, p, spr, m, forward_only=forward_only)
    assert (schedule.name, schedule.pipeline_size, schedule.stages_per_rank) == (name, p, spr)
    assert (schedule.num_micro_batches, schedule.forward_only, schedule.num_stages) == (m, forward_only, p * spr)
    assert len(schedule.actions) == p
    order = simulate_order(schedule)
    assert len(order) == sum(len(a) for a in schedule.actions)
    kinds = {a.kind for actions in schedule.actions for a in actions}
    if p == 1:
        assert not kinds & COMM
    if forward_only:
        assert kinds <= {F, ActionKind.SEND_ACT, ActionKind.RECV_ACT, ActionKind.GROUP_END}
    else:
        reduces = [a for actions in schedule.actions for a in actions if a.kind is RD]
        assert sorted(a.stage for a in reduces) == list(range(p * spr))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_forward_only_is_breadth_first_for_every_name(name: str) -> None:
    p, spr, m = (3, 1, 4) if name in ("gpipe", "1f1b") else (3, 2, 4)
    expected = breadth_first(p, spr, m, forward_only=True).actions
    assert build_schedule(name, p, spr, m, forward_only=True).actions == expected


def test_depth_first_forward_only_accepts_any_micro_batch_count() -> None:
    validate_schedule(depth_first(2, 2, 3, forward_only=True))


def test_communication_labels_and_placement() -> None:
    schedule = build_schedule("breadth_first", 2, 2, 2)
    for rank, actions in enumerate(schedule.actions):
        assert all(schedule.rank_of(a.stage) == rank for a in actions if a != GROUP_END)
    assert Action(ActionKind.SEND_ACT, 3, 0) not in schedule.actions[1]  # the last stage sends nothing
    assert Action(ActionKind.RECV_ACT, 0, 0) not in schedule.actions[0]  # the first stage receives nothing
    assert Action(ActionKind.RECV_ACT, 2, 1) in schedule.actions[0]  # wrap-around boundary 1 -> 2
    assert Action(ActionKind.SEND_GRAD, 2, 1) in schedule.actions[0]
    assert Action(ActionKind.RECV_GRAD, 1, 1) in schedule.actions[1]


def test_small_helpers_and_str() -> None:
    assert str(Action(F, 3, 1)) == "F3.1"
    assert str(Action(ActionKind.SEND_ACT, 0, 2)) == "SA0.2"
    assert str(Action(RD, 5)) == "RD5"
    assert stage_rank(5, 4) == 1
    schedule = breadth_first(4, 3, 2)
    assert schedule.stages_of(1) == [1, 5, 9]
    assert schedule.rank_of(9) == 1


def test_format_has_one_line_per_rank() -> None:
    lines = build_schedule("breadth_first", 3, 2, 2).format().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["rank 0", "rank 1", "rank 2"]
    assert lines[0].startswith("rank 0: F0.0 SA0.0 F0.1")


# breadth_first ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,spr,m", LOOPED_GRID)
def test_breadth_first_order(p: int, spr: int, m: int) -> None:
    schedule = build_schedule("breadth_first", p, spr, m)
    for rank, actions in enumerate(schedule.actions):
        stages = schedule.stages_of(rank)
        forwards = [Action(F, s, mb) for s in stages for mb in range(m)]
        backwards = [Action(B, s, mb) for s in reversed(stages) for mb in range(m)]  # same micro-batch order
        assert computes(actions) == forwards + backwards
        for s in stages:  # REDUCE_GRAD right after the last backward of its stage and the communication after it
            i = actions.index(Action(B, s, m - 1))
            reduce = actions.index(Action(RD, s))
            assert reduce > i and all(a.kind in COMM for a in actions[i + 1 : reduce])
            if s > 0 and p > 1:
                assert actions[i + 1] == Action(ActionKind.SEND_GRAD, s, m - 1)


def test_breadth_first_receives_in_the_step_their_message_is_sent() -> None:
    # rank 1 sends the input of stage 2 (micro-batch 0) after F1.0, which rank 0 receives after its own compute of
    # that step (F0.1), and rank 0 sends F0.2's output while receiving the next message of rank 1 (one group)
    schedule = build_schedule("breadth_first", 2, 2, 3)
    assert line(list(schedule.actions[0][:9])) == "F0.0 SA0.0 F0.1 SA0.1 RA2.0 F0.2 SA0.2 RA2.1 F2.0"
    assert line(list(schedule.actions[1][:7])) == "RA1.0 F1.0 SA1.0 RA1.1 F1.1 SA1.1 RA1.2"
    assert communication_groups(schedule.actions[0])[:3] == [(1,), (3, 4), (6, 7)]


def test_receive_only_groups_are_posted_before_the_computes_they_follow() -> None:
    # GPipe, P = 3: the last rank sends nothing in its forwards, the first nothing in its backwards, so their receives
    # are posted right after their previous group (the first input stays: its shapes are read there), each its own group
    schedule = build_schedule("gpipe", 3, 1, 4)
    assert line(list(schedule.actions[2][:11])) == "RA2.0 | RA2.1 | RA2.2 | RA2.3 F2.0 F2.1 F2.2 F2.3"
    assert line(list(schedule.actions[0][6:])) == "F0.3 SA0.3 RG0.0 | RG0.1 | RG0.2 | RG0.3 B0.0 B0.1 B0.2 B0.3 RD0"
    assert communication_groups(schedule.actions[2])[:4] == [(0,), (2,), (4,), (6,)]
    assert communication_groups(schedule.actions[0])[-4:] == [(7, 8), (10,), (12,), (14,)]
    # the middle rank sends after every compute: its receives stay in lock-step, grouped with the sends before them
    assert line(list(schedule.actions[1][:7])) == "RA1.0 F1.0 SA1.0 RA1.1 F1.1 SA1.1 RA1.2"
    # depth-first (interleaved 1F1B) keeps every receive in lock-step
    assert GROUP_END not in {a for actions in build_schedule("depth_first", 3, 2, 6).actions for a in actions}


def test_receives_moved_past_a_send_of_their_rank_hang_on_nccl() -> None:
    """Why receives grouped with a send stay in lock-step: rank 1's RA1.1, posted before its SG1.0, holds its stream
    while rank 0's SA0.1 waits behind the group SA0.0 RG0.0, which needs SG1.0 (breadth-first in groups of one)."""
    early = make(
        ["F0.0 SA0.0 RG0.0 B0.0 F0.1 SA0.1 RG0.1 B0.1 RD0", "RA1.0 | RA1.1 F1.0 B1.0 SG1.0 F1.1 B1.1 SG1.1 RD1"], 1, 2
    )
    validate_schedule(early)  # fine for gloo, which matches by tag
    with pytest.raises(ScheduleError, match=r"rank 1's stream is stuck in group RA1\.1"):
        validate_stream_order(early)
    validate_stream_order(build_schedule("breadth_first", 2, 1, 2, breadth_first_micro_batches=1))


# gpipe and 1f1b -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,spr,m", ONE_STAGE_GRID)
def test_gpipe_all_forwards_before_backwards(p: int, spr: int, m: int) -> None:
    for actions in build_schedule("gpipe", p, spr, m).actions:
        kinds = [a.kind for a in computes(actions)]
        assert kinds == [F] * m + [B] * m


def test_one_f_one_b_warmup_and_steady_state() -> None:
    schedule = build_schedule("1f1b", 4, 1, 8)
    rank0 = computes(schedule.actions[0])
    assert line(rank0) == "F0.0 F0.1 F0.2 F0.3 B0.0 F0.4 B0.1 F0.5 B0.2 F0.6 B0.3 F0.7 B0.4 B0.5 B0.6 B0.7"
    for rank, actions in enumerate(schedule.actions):
        kinds = [a.kind for a in computes(actions)]
        warmup = min(4 - rank - 1, 8)
        assert kinds[:warmup] == [F] * warmup
        assert kinds[warmup : warmup + 2 * (8 - warmup)] == [F, B] * (8 - warmup)


def test_one_f_one_b_with_fewer_micro_batches_than_ranks() -> None:
    rank0 = computes(build_schedule("1f1b", 4, 1, 2).actions[0])
    assert line(rank0) == "F0.0 F0.1 B0.0 B0.1"


def test_one_f_one_b_sends_and_receives_together() -> None:
    # each compute's send and the receive of the message the neighbour sends in the same step form one group
    schedule = build_schedule("1f1b", 2, 1, 4)
    assert line(list(schedule.actions[0][:6])) == "F0.0 SA0.0 F0.1 SA0.1 RG0.0 B0.0"
    assert line(list(schedule.actions[1][:6])) == "RA1.0 F1.0 RA1.1 B1.0 SG1.0 F1.1"
    assert communication_groups(schedule.actions[0])[:2] == [(1,), (3, 4)]


def test_depth_first_with_one_stage_per_rank_is_one_f_one_b() -> None:
    assert depth_first(4, 1, 6).actions == one_f_one_b(4, 1, 6).actions


# depth_first --------------------------------------------------------------------------------------------------------
def test_depth_first_forward_order_follows_megatron_chunk_groups() -> None:
    schedule = build_schedule("depth_first", 2, 2, 4)
    assert line(computes(schedule.actions[0], F)) == "F0.0 F0.1 F2.0 F2.1 F0.2 F0.3 F2.2 F2.3"
    assert line(computes(schedule.actions[1], F)) == "F1.0 F1.1 F3.0 F3.1 F1.2 F1.3 F3.2 F3.3"
    assert line(computes(schedule.actions[0], B)) == "B2.0 B2.1 B0.0 B0.1 B2.2 B2.3 B0.2 B0.3"
    # the last rank warms up with (L-1)*P forwards, then alternates
    assert line(computes(schedule.actions[1]))[:29] == "F1.0 F1.1 F3.0 B3.0 F3.1 B3.1"


@pytest.mark.parametrize("m", [1, 3, 6])
def test_depth_first_requires_multiple_of_pipeline_size(m: int) -> None:
    with pytest.raises(ScheduleError, match="multiple of pipeline_size=4") as info:
        build_schedule("depth_first", 4, 2, m)
    assert "breadth_first" in str(info.value)
    assert "num_micro_batches=4" in str(info.value) or "num_micro_batches=8" in str(info.value)


# argument errors ----------------------------------------------------------------------------------------------------
def test_argument_errors() -> None:
    with pytest.raises(ScheduleError, match="num_micro_batches must be an integer >= 1, got 0"):
        build_schedule("breadth_first", 2, 1, 0)
    with pytest.raises(ScheduleError, match="pipeline_size must be an integer >= 1, got 0"):
        breadth_first(0, 1, 1)
    with pytest.raises(ScheduleError, match="stages_per_rank must be an integer >= 1, got -1"):
        depth_first(2, -1, 2)
    with pytest.raises(ScheduleError, match=r"unknown schedule 'zigzag'.*breadth_first, depth_first, gpipe, 1f1b"):
        build_schedule("zigzag", 2, 1, 2)
    with pytest.raises(ScheduleError, match="use schedule='breadth_first' for looped stages"):
        gpipe(2, 2, 4)
    with pytest.raises(ScheduleError, match="use schedule='depth_first'"):
        build_schedule("1f1b", 2, 3, 4)


# invalid schedules --------------------------------------------------------------------------------------------------
GOOD_P2 = ["F0.0 SA0.0 RG0.0 B0.0 RD0", "RA1.0 F1.0 B1.0 SG1.0 RD1"]


def test_hand_made_schedule_is_valid() -> None:
    validate_schedule(make(GOOD_P2))
    assert [str(a) for _, a in simulate_order(make(GOOD_P2))][:3] == ["F0.0", "SA0.0", "RG0.0"]


def rejected(schedule: Schedule) -> str:
    with pytest.raises(ScheduleError) as info:
        validate_schedule(schedule)
    message = str(info.value)
    assert schedule.format() in message
    return message


def test_rejects_missing_forward() -> None:
    message = rejected(make(["F0.0 SA0.0 RG0.0 B0.0 RD0", "RA1.0 B1.0 SG1.0 RD1"]))
    assert "F1.0 is missing (expected on rank 1)" in message


def test_rejects_duplicated_action() -> None:
    message = rejected(make(["F0.0 SA0.0 RG0.0 B0.0 RD0 RD0", GOOD_P2[1]]))
    assert "RD0 appears 2 times" in message


def test_rejects_backward_before_forward() -> None:
    message = rejected(make(["RG0.0 B0.0 F0.0 SA0.0 RD0", GOOD_P2[1]]))
    assert "F0.0 (position 2) must come before B0.0 (position 1)" in message


def test_rejects_receive_after_its_forward() -> None:
    message = rejected(make([GOOD_P2[0], "F1.0 RA1.0 B1.0 SG1.0 RD1"]))
    assert "rank 1: RA1.0 (position 1) must come before F1.0 (position 0)" in message


def test_rejects_action_on_wrong_rank() -> None:
    message = rejected(make(["F0.0 SA0.0 RG0.0 B0.0 RD0 RD1", "RA1.0 F1.0 B1.0 SG1.0"]))
    assert "rank 0 position 5: RD1 is on the wrong rank; stage 1 lives on rank 1" in message


def test_rejects_unneeded_and_out_of_range_actions() -> None:
    single = make(["F0.0 SA0.0 F1.0 B1.0 RD1 B0.0 RD0"], stages_per_rank=2)
    assert "SA0.0 is not needed" in rejected(single)
    assert "pipeline_size=1" in rejected(single)
    forward_only = make(["F0.0 SA0.0 RD0", "RA1.0 F1.0"], forward_only=True)
    assert "RD0 is not needed (forward_only" in rejected(forward_only)
    out_of_range = make(["F0.0 F0.1 SA0.0 RG0.0 B0.0 RD0", GOOD_P2[1]])
    assert "F0.1 names micro-batch 1, outside 0..0" in rejected(out_of_range)


def test_rejects_deadlock() -> None:
    # rank 0 waits for the gradient of micro-batch 0 before sending the activation rank 1 needs to produce it
    message = rejected(make(["F0.0 RG0.0 B0.0 SA0.0 RD0", GOOD_P2[1]]))
    assert "deadlock" in message
    assert "rank 0 is blocked at B0.0 (position 2), waiting for SG1.0 on rank 1" in message
    assert "rank 1 is blocked at RA1.0 (position 0), waiting for SA0.0 on rank 0" in message  # for the shapes


def test_rejects_deadlock_across_looped_stages() -> None:
    good = build_schedule("breadth_first", 2, 2, 1)
    rank0 = [a for a in good.actions[0] if a != Action(ActionKind.SEND_ACT, 0, 0)]
    rank0.insert(rank0.index(Action(ActionKind.SEND_ACT, 2, 0)) + 1, Action(ActionKind.SEND_ACT, 0, 0))
    message = rejected(replace(good, actions=(tuple(rank0), good.actions[1])))
    assert "rank 0 is blocked at RA2.0" in message and "waiting for SA1.0 on rank 1" in message  # for the shapes


def test_order_independent_first_send_is_modelled() -> None:
    # rank 1's first forward is micro-batch 1; it also needs the first message of the boundary (SA0.0, sent first)
    schedule = make(["F0.0 F0.1 SA0.0 SA0.1", "RA1.0 RA1.1 F1.1 F1.0"], num_micro_batches=2, forward_only=True)
    order = [(r, str(a)) for r, a in simulate_order(schedule)]
    assert order.index((0, "SA0.0")) < order.index((1, "F1.1"))


# NCCL stream order (lightning_bfpp.plan.stream_order) ---------------------------------------------------------------
def _stream_grid() -> list[tuple[str, int, int, int, bool, int | None]]:
    """Every built-in schedule on P in 2, 3, 4, 8, L in 1..4, M in 1..3P where it exists; breadth-first also in
    every group size, and forward-only (the same order for every name, see test_forward_only_is_breadth_first;
    evaluation does not group micro-batches)."""
    grid = []
    for p in (2, 3, 4, 8):
        for spr in range(1, 5):
            for m in range(1, 3 * p + 1):
                grid += [("breadth_first", p, spr, m, False, g) for g in range(1, m + 1) if m % g == 0]
                grid.append(("breadth_first", p, spr, m, True, None))
                if spr == 1:
                    grid += [("gpipe", p, 1, m, False, None), ("1f1b", p, 1, m, False, None)]
                elif m % p == 0:
                    grid.append(("depth_first", p, spr, m, False, None))
    return grid


@pytest.fixture
def few_garbage_collections():
    """Keeps the cyclic garbage collector from rescanning everything imported (torch) while a test allocates a lot:
    the grid below runs three times faster."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_no_built_in_schedule_can_hang_on_nccl(p: int, few_garbage_collections: None) -> None:
    for name, size, spr, m, forward_only, group in (case for case in _stream_grid() if case[1] == p):
        groups = {} if group in (None, m) else {"breadth_first_micro_batches": group}
        schedule = SCHEDULES[name](size, spr, m, forward_only=forward_only, **groups)
        validate_stream_order(schedule)  # a step that learns the shapes, then one that knows them


def test_no_schedule_can_hang_on_nccl_with_sharded_parameters() -> None:
    from lightning_bfpp.plan.gathering import add_parameter_gathering

    layouts = [("breadth_first", 4, 2, 8), ("depth_first", 4, 2, 8), ("1f1b", 4, 1, 8), ("gpipe", 3, 1, 5)]
    for (name, p, spr, m), zero3 in itertools.product(layouts, (True, False)):
        validate_stream_order(add_parameter_gathering(build_schedule(name, p, spr, m), reshard_after_forward=zero3))
    grouped = build_schedule("breadth_first", 4, 2, 8, breadth_first_micro_batches=2)
    validate_stream_order(add_parameter_gathering(grouped))


@pytest.mark.parametrize("headers", [True, False], ids=["shapes-learned", "shapes-known"])
def test_the_earlier_single_operation_order_hangs_on_nccl(headers: bool) -> None:
    """Receives posted on their own one compute early: 1F1B's rank 1 waits for the activation of micro-batch 1
    before it sends the gradient of micro-batch 0, which rank 0 waits for before it sends that activation."""
    early = _with_early_receives(build_schedule("1f1b", 2, 1, 4))
    validate_schedule(early)  # fine for gloo, which matches by tag
    with pytest.raises(ScheduleError) as info:
        check_stream_order(early, batched=False, headers=headers)
    message = str(info.value)
    assert "NCCL could hang (every transfer issued on its own" in message
    assert "rank 0 cannot run B0.0: it waits for the transfers of group RG0.0" in message
    assert "rank 1 cannot run F1.1: it waits for the transfers of group RA1.1" in message
    assert "yet to receive the gradient of the input of stage 1, micro-batch 0 from rank 1" in message
    assert "yet to receive the input of stage 1, micro-batch 1 from rank 0" in message
    interleaved = _with_early_receives(build_schedule("depth_first", 2, 2, 4))
    with pytest.raises(ScheduleError, match="NCCL could hang"):
        check_stream_order(interleaved, batched=False, headers=headers)
    with pytest.raises(ScheduleError, match="NCCL could hang"):  # batching alone does not save that order
        check_stream_order(early, headers=headers)


def test_receives_out_of_send_order_are_rejected_for_nccl() -> None:
    swapped = make(["F0.0 SA0.0 F0.1 SA0.1", "RA1.1 RA1.0 F1.0 F1.1"], num_micro_batches=2, forward_only=True)
    validate_schedule(swapped)  # fine for gloo, which matches by tag
    pairs = (
        r"rank 0 sends the input of stage 1, micro-batch 0 .* while rank 1 receives the input of stage 1, micro-batch 1"
    )
    with pytest.raises(ScheduleError, match=pairs + " .*NCCL pairs them in issue order"):
        validate_stream_order(swapped)


# memory-bounded breadth-first (groups of micro-batches) -------------------------------------------------------------
GROUPED_SIZES = [(1, 2, 4), (2, 1, 4), (2, 2, 4), (3, 2, 6), (4, 2, 8), (2, 3, 6)]
GROUPED_GRID = [(p, spr, m, g) for p, spr, m in GROUPED_SIZES for g in range(1, m + 1) if m % g == 0]


def live_activations(actions: tuple[Action, ...]) -> tuple[int, int]:
    """The peak number of micro-batches whose activations a rank keeps, over all its stages and per stage: a forward
    creates them, the backward of the same stage and micro-batch frees them."""
    live: dict[int, int] = {}
    peak = peak_stage = 0
    for action in computes(actions):
        live[action.stage] = live.get(action.stage, 0) + (1 if action.kind is F else -1)
        peak, peak_stage = max(peak, sum(live.values())), max(peak_stage, live[action.stage])
    return peak, peak_stage


@pytest.mark.parametrize("p,spr,m,g", GROUPED_GRID)
def test_grouped_breadth_first_bounds_live_activations_by_the_group(p: int, spr: int, m: int, g: int) -> None:
    schedule = build_schedule("breadth_first", p, spr, m, breadth_first_micro_batches=g)
    validate_stream_order(schedule)  # also on NCCL
    for rank, actions in enumerate(schedule.actions):
        stages = schedule.stages_of(rank)
        assert live_activations(actions) == (spr * g, g)  # plain breadth-first: (spr * m, m)
        expected = []
        for start in range(0, m, g):
            group = range(start, start + g)
            expected += [Action(F, s, mb) for s in stages for mb in group]
            expected += [Action(B, s, mb) for s in reversed(stages) for mb in group]
        assert computes(actions) == expected
        for s in stages:  # one reduction per stage, right after its last backward (of the last group) and its group
            reduce = actions.index(Action(RD, s))
            i = actions.index(Action(B, s, m - 1))
            assert reduce > i and all(a.kind in COMM for a in actions[i + 1 : reduce])


@pytest.mark.parametrize("p,spr,m", LOOPED_GRID)
@pytest.mark.parametrize("forward_only", [False, True])
def test_one_group_of_all_micro_batches_is_plain_breadth_first(p: int, spr: int, m: int, forward_only: bool) -> None:
    plain = build_schedule("breadth_first", p, spr, m, forward_only=forward_only)
    assert build_schedule("breadth_first", p, spr, m, forward_only=forward_only, breadth_first_micro_batches=m) == plain
    if not forward_only:
        assert live_activations(plain.actions[0]) == (spr * m, m)


def test_grouped_receives_are_posted_per_group() -> None:
    actions = line(list(build_schedule("breadth_first", 2, 1, 4, breadth_first_micro_batches=2).actions[1]))
    assert actions == "RA1.0 | RA1.1 F1.0 F1.1 B1.0 SG1.0 B1.1 SG1.1 RA1.2 | RA1.3 F1.2 F1.3 B1.2 SG1.2 B1.3 SG1.3 RD1"


def test_group_size_errors_list_the_valid_sizes() -> None:
    with pytest.raises(ScheduleError, match=r"=4 must divide the number of micro-batches \(6\).*use one of 1, 2, 3, 6"):
        build_schedule("breadth_first", 2, 2, 6, breadth_first_micro_batches=4)
    with pytest.raises(ScheduleError, match=r"schedule='depth_first': remove it, or use schedule='breadth_first'"):
        build_schedule("depth_first", 2, 2, 4, breadth_first_micro_batches=2)
    with pytest.raises(ScheduleError, match="must be an integer >= 1 or None, got 0"):
        breadth_first(2, 2, 4, breadth_first_micro_batches=0)
