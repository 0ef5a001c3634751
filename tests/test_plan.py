"""The planner: model and cluster arithmetic, the search (pruned = exhaustive), memory filtering and the command."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lightning_bfpp.lightning.strategy import AUTOCAST_DTYPES
from lightning_bfpp.options import PipelineOptions
from lightning_bfpp.plan import (
    GB,
    PLAN_WEIGHT_GRADIENTS,
    ClusterSpec,
    Layout,
    ModelSpec,
    cost_model,
    layouts,
    lower_bound,
    main,
    peak_memory,
    plan,
    predict,
    variants,
)
from lightning_bfpp.plan.efficiency import FLAT, EfficiencyCurve
from lightning_bfpp.plan.search import _schedule
from lightning_bfpp.plan.simulate import SHARDING_MODES, resident_bytes, simulate
from lightning_bfpp.plan.specs import BATCHED_SHARDING
from lightning_bfpp.run.data_parallel import fsdp_mixed_precision
from lightning_bfpp.run.weight_grad import WEIGHT_GRADIENTS

SMALL = ModelSpec(layers=8, hidden=1024, seq_len=512, vocab=8192)
CLUSTER = ClusterSpec(nodes=2, gpus_per_node=4, gpu_memory_gb=4.0, gpu_tflops=100.0)
STEEP = EfficiencyCurve(((512.0, 0.25), (4096.0, 1.0)), "synthetic: a quarter of the throughput at 512 rows")
SMALL_ARGV = ["--layers", "8", "--hidden", "1024", "--seq-len", "512", "--vocab", "8192", "--nodes", "2"]
SMALL_ARGV += ["--gpus-per-node", "4", "--gpu-memory-gb", "4"]


def test_52b_shape_from_the_parameter_count() -> None:
    model = ModelSpec.from_params(52e9)
    assert (model.layers, model.hidden) == (64, 8192)
    assert model.params == pytest.approx(52e9, rel=0.01)
    assert ModelSpec.from_params(52e9, layers=32).hidden == 11648  # sqrt(52e9 / (12 x 32)), a multiple of 128


def test_cost_model_splits_time_parameters_and_links() -> None:
    layout = Layout("breadth_first", 2, 2, 4, micro_batch_size=2, num_micro_batches=4)
    cost = cost_model(SMALL, CLUSTER, layout)
    # micro-batches of 2 x 512 = 1024 rows compute at the default curve's 0.9 of the saturated efficiency
    rate = CLUSTER.gpu_tflops * 1e12 * CLUSTER.compute_efficiency * CLUSTER.efficiency(2 * 512)
    assert CLUSTER.efficiency(2 * 512) == 0.9
    assert sum(cost.forward_time) == pytest.approx(2 * (8 * SMALL.layer_flops + SMALL.head_flops) / rate)
    assert cost.forward_time[0] == pytest.approx(2 * 2 * SMALL.layer_flops / rate)
    assert sum(cost.stage_params) == SMALL.params + SMALL.vocab * SMALL.hidden  # the last stage's output embedding
    assert cost.boundary_bytes == 2 * 2 * 512 * 1024
    # dp_contiguous, D = 4 = GPUs per node: replicas share a node, the pipeline link crosses nodes
    assert cost.dp_bandwidth == 200e9 and list(cost.p2p_bandwidth) == [25e9, 25e9]
    swapped = cost_model(SMALL, CLUSTER, replace(layout, rank_layout="pp_contiguous"))
    assert swapped.dp_bandwidth == 25e9 and list(swapped.p2p_bandwidth) == [200e9, 200e9]
    with pytest.raises(ValueError, match="choose P x L dividing it"):
        cost_model(SMALL, CLUSTER, replace(layout, stages_per_rank=3))


def test_bf16_mixed_full_sharding_bytes_are_those_the_strategy_sends() -> None:
    """ZeRO-3 under bf16-mixed: the planner gathers in the parameter dtype and reduces in the reduction dtype of the
    FSDP policy the strategy derives from the precision, and sends the stage outputs in autocast's dtype; each rank
    keeps float32 parameters, gradients and Adam moments."""
    policy = fsdp_mixed_precision(AUTOCAST_DTYPES["bf16-mixed"])  # what the strategy gives FSDP under bf16-mixed
    layout = Layout("breadth_first", 2, 2, 4, micro_batch_size=2, num_micro_batches=4, sharding="full")
    cost = cost_model(SMALL, CLUSTER, layout)
    assert (cost.gathered_bytes, cost.grad_bytes) == (policy.param_dtype.itemsize, policy.reduce_dtype.itemsize)
    assert (cost.gathered_bytes, cost.grad_bytes, cost.param_bytes, cost.optimizer_bytes) == (2, 4, 4, 8)
    assert cost.boundary_bytes == torch.bfloat16.itemsize * 2 * 512 * 1024  # micro-batch 2 x sequence x hidden
    events = simulate(_schedule("breadth_first", 2, 2, 4), cost).events
    share = (layout.data_parallel_size - 1) / layout.data_parallel_size
    for kind, element in (("all_gather", 2), ("reduce_scatter", 4)):
        event = next(e for e in events if e.category == kind and e.name == f"{kind} 1")
        moved = share * cost.stage_params[1] * element
        assert event.end - event.start == pytest.approx(cost.dp_latency + moved / cost.dp_bandwidth), kind
    resident = resident_bytes(cost.stage_params[1], cost)
    assert resident == pytest.approx(tuple(cost.stage_params[1] * b / 4 for b in (4, 4, 8)))


def test_lower_bound_is_a_bound_and_exact_for_gpipe_without_communication() -> None:
    free = replace(CLUSTER, intra_node_gbps=1e9, inter_node_gbps=1e9, latency_us=0.0)
    for layout in [
        Layout("gpipe", 4, 1, 2, 1, 6),
        Layout("breadth_first", 2, 4, 4, 1, 4, sharding="full"),
        Layout("depth_first", 2, 2, 4, 2, 2, activation_checkpointing=True),
        Layout("breadth_first", 8, 1, 1, 1, 3, accumulation=2),
        Layout("gpipe", 8, 1, 1, 1, 8, weight_gradients="batched"),  # W may overlap the lower stages' backwards
        Layout("breadth_first", 2, 2, 4, 2, 4, weight_gradients="batched"),
    ]:
        for cluster in (CLUSTER, free):
            assert lower_bound(cost_model(SMALL, cluster, layout), layout) <= predict(SMALL, cluster, layout).step_time
    gpipe = Layout("gpipe", 4, 1, 2, 1, 6)
    exact = predict(SMALL, free, gpipe).step_time
    assert lower_bound(cost_model(SMALL, free, gpipe), gpipe) == pytest.approx(exact, rel=1e-6)


def test_extrapolated_micro_batches_match_the_full_simulation() -> None:
    for layout in [Layout("depth_first", 2, 2, 4, 1, 24), Layout("breadth_first", 4, 2, 2, 1, 20, sharding="full")]:
        full, short = predict(SMALL, CLUSTER, layout, max_simulated=100), predict(SMALL, CLUSTER, layout, 4)
        assert short.simulated_micro_batches < layout.num_micro_batches == full.simulated_micro_batches
        assert short.step_time == pytest.approx(full.step_time, rel=1e-9)
        assert short.peak_memory_bytes == pytest.approx(full.peak_memory_bytes, rel=1e-9)


def test_accumulation_adds_quiet_passes() -> None:
    one = Layout("breadth_first", 2, 2, 4, 1, 4)
    two = predict(SMALL, CLUSTER, replace(one, accumulation=2))
    quiet = simulate(_schedule("breadth_first", 2, 2, 4), replace(cost_model(SMALL, CLUSTER, one), dp_size=1))
    assert two.step_time == pytest.approx(predict(SMALL, CLUSTER, one).step_time + quiet.step_time)
    assert two.tokens_per_second > predict(SMALL, CLUSTER, one).tokens_per_second  # the reductions are amortized


def test_pruned_search_equals_exhaustive_search() -> None:
    budget = CLUSTER.gpu_memory_gb * GB * CLUSTER.usable_memory
    for batch in (8, 32):
        everything = []
        for base in layouts(SMALL, CLUSTER, batch, ("breadth_first", "depth_first", "gpipe"), max_accumulation=8):
            for layout in variants(base):
                if peak_memory(SMALL, CLUSTER, layout) <= budget:
                    everything.append(predict(SMALL, CLUSTER, layout))
                    break  # the first variant that fits, as plan() does
        everything.sort(key=lambda r: r.step_time)
        found = plan(SMALL, CLUSTER, batch, top=5)
        assert len(found.results) < len(everything)
        assert [r.step_time for r in found.results[:5]] == pytest.approx([r.step_time for r in everything[:5]])
        for name in ("breadth_first", "depth_first", "gpipe"):
            best = min(r.step_time for r in everything if r.layout.schedule == name)
            assert min(r.step_time for r in found.results if r.layout.schedule == name) == pytest.approx(best)
        assert all(r.peak_memory_bytes <= budget for r in found.results)


def test_nothing_fits_in_a_tiny_memory() -> None:
    assert plan(SMALL, replace(CLUSTER, gpu_memory_gb=0.05), 16).results == []


def test_breadth_first_wins_at_half_a_sequence_per_gpu_for_52b_on_64_gpus() -> None:
    """The paper's setting: with a small batch per GPU only the looped breadth-first schedule hides the bubble."""
    found = plan(ModelSpec.from_params(52e9), ClusterSpec(), 32, top=1)
    best = {s: next(r for r in found.results if r.layout.schedule == s) for s in ("breadth_first", "depth_first")}
    assert found.results[0].layout.schedule == "breadth_first" and found.results[0].layout.stages_per_rank > 1
    assert best["breadth_first"].tflops_per_gpu > 1.2 * best["depth_first"].tflops_per_gpu


def test_command_prints_table_comparison_and_plot(tmp_path, capsys) -> None:
    argv = [*SMALL_ARGV, "--batch-per-gpu", "1", "4", "--top", "3", "--compare"]
    plot = tmp_path / "plan.png"
    pytest.importorskip("matplotlib")
    assert main([*argv, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "global batch 8 sequences (1 per GPU)" in out and "global batch 32 sequences (4 per GPU)" in out
    assert "TFLOP/s/GPU" in out and "| batch/GPU | global batch | breadth_first | depth_first | gpipe | best |" in out
    assert plot.stat().st_size > 10_000
    assert out.count("strategy = BFPPStrategy(pipeline_parallel_size=") == 2  # what to run, per batch size
    assert out.count("Hydra: trainer=gpu strategy=bfpp strategy.pipeline_parallel_size=") == 2


def test_command_errors_name_the_fix(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--global-batch", "8"])
    assert "describe the model with --params" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--params", "1e9", "--batch-per-gpu", "0.3"])
    assert "whole number of sequences" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--params", "1e9", "--global-batch", "8", "--efficiency-curve", __file__])
    err = capsys.readouterr().err
    assert "is not an efficiency curve" in err and "measure-efficiency --output FILE" in err


def test_measured_efficiency_curve_round_trips_into_the_planner(tmp_path, capsys) -> None:
    """measure-efficiency writes a curve (throughput per size over the best) that --efficiency-curve reads back into
    the cluster the planner plans for, and the plan's compute times follow it."""
    path = tmp_path / "curve.json"
    measure = ["measure-efficiency", "--hidden", "32", "--sizes", "8,64", "--dtype", "float32", "--repeats", "1"]
    assert main([*measure, "--output", str(path)]) == 0
    curve = EfficiencyCurve.from_json(path)
    assert [r for r, _ in curve.points] == [8.0, 64.0] and curve.peak == 1.0 and "measured on cpu" in curve.source
    assert main([*SMALL_ARGV, "--global-batch", "8", "--top", "1", "--efficiency-curve", str(path)]) == 0
    assert curve.describe() in capsys.readouterr().out
    flat, measured = (replace(CLUSTER, efficiency=c) for c in (FLAT, curve))
    layout = Layout("gpipe", 8, 1, 1, 1, 8)
    ratio = cost_model(SMALL, measured, layout).forward_time[0] / cost_model(SMALL, flat, layout).forward_time[0]
    assert ratio == pytest.approx(1 / curve.points[-1][1])  # 512 rows: past the last point, its efficiency


def test_small_micro_batches_penalized_choose_fewer_larger_micro_batches() -> None:
    """Flat efficiency: the most micro-batches (the smallest bubble) win. At a quarter of the throughput for 512-row
    products the planner takes micro-batches of 4 sequences (2048 rows) instead, though the bubble is larger."""
    per_micro_batch = ("per_micro_batch",)
    flat = plan(SMALL, replace(CLUSTER, efficiency=FLAT), 32, top=1, weight_gradients=per_micro_batch).results[0]
    steep = plan(SMALL, replace(CLUSTER, efficiency=STEEP), 32, top=1, weight_gradients=per_micro_batch).results[0]
    assert (flat.layout.micro_batch_size, flat.layout.num_micro_batches) == (1, 8)
    assert (steep.layout.micro_batch_size, steep.layout.num_micro_batches) == (4, 2)
    assert steep.bubble_fraction > flat.bubble_fraction


def test_batched_weight_gradients_are_chosen_where_their_modelled_cost_is_lower() -> None:
    """GPipe P = 2, M = 8 micro-batches of 512 rows: batched, each stage's weight gradients are one product over
    4096 rows (efficiency 1 instead of 0.25), at the cost of every backward's Linear inputs and output gradients
    (16 h per token and layer in bf16) kept until the W. The planner picks batched, never with ZeRO-2/3."""
    cluster = replace(CLUSTER, efficiency=STEEP, gpu_memory_gb=40.0)
    layout = Layout("gpipe", 2, 1, 4, 1, 8)
    per_micro_batch, batched = (predict(SMALL, cluster, replace(layout, weight_gradients=w)) for w in WEIGHT_GRADIENTS)
    assert batched.step_time < 0.8 * per_micro_batch.step_time
    kept = cost_model(SMALL, cluster, replace(layout, weight_gradients="batched")).weight_grad_bytes
    assert kept[0] == 2 * 512 * 16 * 1024 * 4  # bf16, 512 rows, 4 layers per stage
    assert cost_model(SMALL, cluster, layout).weight_grad_bytes == 0.0
    # the operands replace the activations each backward frees (16 h against 34 h): the peak before the first
    # backward stays; with activation checkpointing only stage inputs were kept, and the operands raise the peak
    assert batched.peak_memory_bytes == per_micro_batch.peak_memory_bytes
    ckpt = replace(layout, activation_checkpointing=True)
    batched_ckpt = peak_memory(SMALL, cluster, replace(ckpt, weight_gradients="batched"))
    assert batched_ckpt > peak_memory(SMALL, cluster, ckpt) + 6 * kept[0]  # 7 or 8 backwards' operands at once
    found = plan(SMALL, cluster, 32, top=3)
    assert found.results[0].layout.weight_gradients == "batched"
    assert all(r.layout.sharding in BATCHED_SHARDING for r in found.results if r.layout.weight_gradients == "batched")


def test_planned_weight_gradient_modes_are_the_strategys() -> None:
    assert PLAN_WEIGHT_GRADIENTS == WEIGHT_GRADIENTS
    for mode in SHARDING_MODES:
        if mode in BATCHED_SHARDING:
            PipelineOptions(weight_gradients="batched", sharding=mode)
        else:
            with pytest.raises(ValueError, match="does not work with sharding"):
                PipelineOptions(weight_gradients="batched", sharding=mode)


# ------------------------------------------------------------------------------------------ what the planner prints
def test_the_printed_settings_run_the_planned_layout() -> None:
    """The planner prints the layout as a ``BFPPStrategy(...)`` call that evaluates, and as Hydra overrides that the
    example app's config composes into the same strategy, Trainer sizes and batch size."""
    import sys
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lightning_bfpp import BFPPStrategy
    from lightning_bfpp.plan.settings import format_settings, hydra_overrides, strategy_call, strategy_options

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "examples"))
    from bfpp_examples.config import register_configs

    register_configs()
    cluster = ClusterSpec(nodes=2, gpus_per_node=4)
    layout = Layout(
        "depth_first", 2, 2, 4, 2, 8, sharding="optimizer", activation_checkpointing=True, accumulation=3,
        rank_layout="pp_contiguous", weight_gradients="batched",
    )  # fmt: skip
    expected = PipelineOptions(**strategy_options(layout))  # type: ignore[arg-type]
    assert (expected.micro_batches, expected.activation_checkpointing) == (8, "stage")
    assert eval(strategy_call(layout), {"BFPPStrategy": BFPPStrategy}).options == expected

    with initialize_config_dir(version_base="1.3", config_dir=str(root / "conf")):
        cfg = compose("train", overrides=hydra_overrides(layout, cluster))
    assert instantiate(cfg.strategy, _convert_="all").options == replace(expected, timeout=expected.timeout)
    trainer = (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.accumulate_grad_batches)
    assert trainer == ("gpu", 4, 2, 3) and cfg.data.batch_size == 16  # M = 8 micro-batches of 2

    text = format_settings([layout], cluster)
    assert strategy_call(layout) in text and " ".join(hydra_overrides(layout, cluster)) in text
    single = replace(layout, pipeline_size=1, data_parallel_size=8, schedule="breadth_first", sharding="none")
    text = format_settings([single, layout], cluster)
    assert text.startswith("the fastest layout has P = 1") and "strategy='ddp' instead of bfpp" in text
    assert f"P > 1):\n  strategy = {strategy_call(layout)}" in text


def test_rows_of_equal_predictions_are_merged() -> None:
    """Layouts whose rows would print the same (e.g. with P = 1, every schedule) share one row, values as a/b."""
    from lightning_bfpp.plan.report import format_table, merge_rows

    results = plan(SMALL, replace(CLUSTER, gpu_memory_gb=40.0), 8, top=8).results
    groups = merge_rows(results)
    assert len(groups) < len(results), "this plan has layouts of equal predictions"
    table = format_table(results, top=len(results)).splitlines()
    rows = [line for line in table[1:] if line[:1].isalpha() and line.split()[1].isdigit()]
    assert len(rows) == len(groups)
    merged = next(g for g in groups if len(g) > 1)
    assert "/" in rows[groups.index(merged)] and table[-1] == "a/b: layouts with the same prediction, in one row"


def test_host_time_per_action_slows_short_kernels_only() -> None:
    """``--host-us``: the planner charges the host's time per action to a host that queues ahead of the GPUs, so a
    layout of many short actions slows down while one of long kernels does not; a negative time is refused."""
    model = ModelSpec(layers=8, hidden=256, seq_len=128, vocab=512)
    layout = Layout("breadth_first", 2, 4, 4, 1, 2)
    free, hosted = (predict(model, replace(CLUSTER, host_us=us), layout) for us in (0.0, 1e4))
    assert cost_model(model, replace(CLUSTER, host_us=1e4), layout).host_time == pytest.approx(0.01)
    assert not cost_model(model, CLUSTER, layout).host_blocking
    assert hosted.step_time > 2 * free.step_time  # kernels of microseconds: the host's 10 ms per action bounds the step
    slow_kernels = replace(model, layer_forward_s=1.0)
    assert predict(slow_kernels, replace(CLUSTER, host_us=1e4), layout).step_time == pytest.approx(
        predict(slow_kernels, CLUSTER, layout).step_time, rel=0.02
    )
    with pytest.raises(ValueError, match="--host-us must be >= 0"):
        ClusterSpec(host_us=-1.0)
