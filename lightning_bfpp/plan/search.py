"""Ranks pipeline layouts of a GPT-like model on a GPU cluster by simulated throughput within memory.

    python -m lightning_bfpp.plan --params 52e9 --nodes 8 --gpus-per-node 8 --batch-per-gpu 0.5 1 2 4 8 --compare

For every global batch size it enumerates ``P`` (pipeline ranks), ``L`` (stages per rank), the micro-batch size (so
``M``), gradient accumulation ``A``, ``D = GPUs / P``, the schedule, the sharding mode, activation checkpointing,
batched or per-micro-batch weight gradients and the rank layout; keeps what fits in memory
(:func:`lightning_bfpp.plan.simulate.estimate_memory`) and ranks it by the step time of
:func:`lightning_bfpp.plan.simulate.simulate`, visiting candidates by a lower bound so that most need no simulation.
Compute slows down at small micro-batches by a kernel efficiency curve (``--efficiency-curve``; measure one with
``python -m lightning_bfpp.plan measure-efficiency``). Every number is a prediction of that cost model, not a
measurement.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from lightning_bfpp.plan.efficiency import FLAT, EfficiencyCurve
from lightning_bfpp.plan.report import (
    HEADER,
    best_per_schedule,
    format_comparison,
    format_row,
    format_table,
    plot_comparison,
)
from lightning_bfpp.plan.schedule import SCHEDULES, Schedule
from lightning_bfpp.plan.settings import format_settings
from lightning_bfpp.plan.simulate import SHARDING_MODES, CostModel, estimate_memory, resident_bytes, simulate
from lightning_bfpp.plan.specs import (
    ACTIVATION_BYTES,
    BATCHED_SHARDING,
    GATHER_BYTES,
    GB,
    GRAD_BYTES,
    OPTIMIZER_BYTES,
    PARAM_BYTES,
    PLAN_WEIGHT_GRADIENTS,
    RANK_LAYOUTS,
    ClusterSpec,
    Layout,
    ModelSpec,
    Prediction,
    cost_model,
)
from lightning_bfpp.plan.weight_flush import add_weight_flush

PLAN_SCHEDULES = ("breadth_first", "depth_first", "gpipe")

__all__ = [  # the specs, their cost model and the report live in their own modules; this module keeps their names
    "ACTIVATION_BYTES",
    "GATHER_BYTES",
    "GB",
    "GRAD_BYTES",
    "HEADER",
    "OPTIMIZER_BYTES",
    "PARAM_BYTES",
    "PLAN_SCHEDULES",
    "PLAN_WEIGHT_GRADIENTS",
    "RANK_LAYOUTS",
    "ClusterSpec",
    "Layout",
    "ModelSpec",
    "Plan",
    "Prediction",
    "add_arguments",
    "best_per_schedule",
    "cost_model",
    "format_comparison",
    "format_row",
    "format_table",
    "layouts",
    "lower_bound",
    "main",
    "peak_memory",
    "plan",
    "plot_comparison",
    "predict",
    "simulated_micro_batches",
    "specs_from_args",
    "variants",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (GPT-like)")
    model.add_argument("--params", type=float, help="parameters in the blocks, e.g. 52e9 (derives --hidden)")
    model.add_argument("--layers", type=int, help="transformer blocks")
    model.add_argument("--hidden", type=int, help="hidden size")
    model.add_argument("--seq-len", type=int, default=1024, help="sequence length in tokens (1024)")
    model.add_argument("--vocab", type=int, default=51200, help="vocabulary size (51200)")
    model.add_argument("--heads", type=int, default=0, help="attention heads (default hidden / 128)")
    model.add_argument("--no-flash-attention", action="store_true", help="store the attention matrix")
    model.add_argument("--layer-forward-ms", type=float, help="profile: one layer's forward for one sequence")
    model.add_argument("--layer-activation-mb", type=float, help="profile: one layer's activations per sequence, MiB")
    cluster = parser.add_argument_group("cluster")
    defaults = ClusterSpec()
    for name, kind, help_text in (
        ("nodes", int, "nodes"),
        ("gpus_per_node", int, "GPUs per node"),
        ("gpu_memory_gb", float, "memory per GPU, GiB"),
        ("gpu_tflops", float, "peak TFLOP/s per GPU (bf16)"),
        ("compute_efficiency", float, "share of the peak a stage reaches while it computes"),
        ("intra_node_gbps", float, "GB/s per GPU inside a node"),
        ("inter_node_gbps", float, "GB/s per GPU across nodes"),
        ("latency_us", float, "latency of a transfer (and per ring step of a collective), microseconds"),
        ("host_us", float, "host time to issue one action (measure it: benchmarks/host_overhead.py), microseconds"),
        ("usable_memory", float, "share of the GPU memory the layout may use"),
    ):
        default = getattr(defaults, name)
        cluster.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=f"{help_text} ({default})")
    cluster.add_argument(
        "--efficiency-curve",
        help="JSON file of kernel efficiency by rows per product (written by `measure-efficiency`), or `flat`; "
        "default: an assumed GPU curve (lightning_bfpp.plan.efficiency.DEFAULT_GPU_CURVE)",
    )


def specs_from_args(args: argparse.Namespace) -> tuple[ModelSpec, ClusterSpec]:
    """The model and cluster of the command line; ValueError names the missing or wrong option."""
    shape = {
        "seq_len": args.seq_len,
        "vocab": args.vocab,
        "heads": args.heads,
        "flash_attention": not args.no_flash_attention,
        "layer_forward_s": args.layer_forward_ms / 1e3 if args.layer_forward_ms else None,
        "layer_activation_bytes": args.layer_activation_mb * 2**20 if args.layer_activation_mb else None,
    }
    if args.layers and args.hidden:
        model = ModelSpec(layers=args.layers, hidden=args.hidden, **shape)
    elif args.params:
        model = ModelSpec.from_params(args.params, args.layers, **shape)
    else:
        raise ValueError("describe the model with --params (and optionally --layers), or with --layers and --hidden")
    fields = {f: getattr(args, f) for f in ClusterSpec.__dataclass_fields__ if f != "efficiency"}
    if args.efficiency_curve == "flat":
        fields["efficiency"] = FLAT
    elif args.efficiency_curve:
        fields["efficiency"] = EfficiencyCurve.from_json(args.efficiency_curve)
    cluster = ClusterSpec(**fields)
    return model, cluster


@functools.lru_cache(maxsize=4096)
def _schedule(
    name: str, pipeline_size: int, stages_per_rank: int, num_micro_batches: int, batched: bool = False
) -> Schedule:
    # The built-in generators are validated by the test suite; validating here too would double the planner's time.
    schedule = SCHEDULES[name](pipeline_size, stages_per_rank, num_micro_batches)
    return add_weight_flush(schedule) if batched else schedule


def _layout_schedule(layout: Layout, num_micro_batches: int) -> Schedule:
    batched = layout.weight_gradients == "batched"
    return _schedule(layout.schedule, layout.pipeline_size, layout.stages_per_rank, num_micro_batches, batched)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def simulated_micro_batches(layout: Layout, max_simulated: int) -> tuple[int, int] | None:
    """The two micro-batch counts to simulate and extrapolate from, or None to simulate ``M`` itself.

    Past ``max(max_simulated, 3 P)`` micro-batches a step grows linearly with ``M`` (the pipeline is in its steady
    state), so the planner simulates two multiples of ``P`` there and extrapolates time and memory.
    """
    p, m = layout.pipeline_size, layout.num_micro_batches
    upper = max(max_simulated, 3 * p) // p * p
    return None if m <= upper else (upper - p, upper)


def _extrapolate(values: Sequence[float], points: tuple[int, int], target: int) -> float:
    (low, high), (m_low, m_high) = values, points
    return high + (high - low) / (m_high - m_low) * (target - m_high)


@functools.lru_cache(maxsize=65536)
def peak_memory(model: ModelSpec, cluster: ClusterSpec, layout: Layout, max_simulated: int = 24) -> float:
    """Predicted peak memory (bytes) of the fullest GPU, without timing the step."""
    if layout.accumulation != 1 or layout.rank_layout != RANK_LAYOUTS[0]:  # neither changes the memory
        return peak_memory(model, cluster, replace(layout, accumulation=1, rank_layout=RANK_LAYOUTS[0]), max_simulated)
    cost = cost_model(model, cluster, layout)
    params, p = list(cost.stage_params), layout.pipeline_size  # type: ignore[arg-type]
    resident = max(sum(resident_bytes(sum(params[r::p]), cost)) for r in range(p))
    if resident > cluster.gpu_memory_gb * GB * cluster.usable_memory:
        return resident  # too large before any activation: no need to walk the schedule
    points = simulated_micro_batches(layout, max_simulated)
    values = [
        estimate_memory(
            _layout_schedule(layout, m),
            cost_model(model, cluster, replace(layout, num_micro_batches=m)),
        ).max_peak_bytes
        for m in (points or (layout.num_micro_batches,))
    ]
    return values[0] if points is None else _extrapolate(values, points, layout.num_micro_batches)


def _simulate_pass(
    model: ModelSpec, cluster: ClusterSpec, layout: Layout, max_simulated: int, quiet: bool
) -> tuple[float, float, float]:
    """(step time, busy time summed over ranks, peak memory) of one pass over ``M`` micro-batches; ``quiet``: a
    pass that only accumulates gradients, without data-parallel communication."""
    points = simulated_micro_batches(layout, max_simulated)
    runs = []
    for m in points or (layout.num_micro_batches,):
        cost = cost_model(model, cluster, replace(layout, num_micro_batches=m))
        schedule = _layout_schedule(layout, m)
        result = simulate(schedule, replace(cost, dp_size=1) if quiet else cost, record_events=False)
        runs.append((result.step_time, sum(result.compute_time), result.memory.max_peak_bytes))
    if points is None:
        return runs[0]
    step, busy, memory = (_extrapolate(v, points, layout.num_micro_batches) for v in zip(*runs, strict=True))
    return step, busy, memory


def predict(model: ModelSpec, cluster: ClusterSpec, layout: Layout, max_simulated: int = 24) -> Prediction:
    """Simulates ``layout`` (extrapolating from fewer micro-batches past ``max_simulated``).

    With gradient accumulation the step is one pass with data-parallel communication and ``A - 1`` passes without
    it (with ZeRO-2/3, which reduce-scatter in every pass, ``A`` passes with it).
    """
    step, busy, memory = _simulate_pass(model, cluster, layout, max_simulated, quiet=False)
    if layout.accumulation > 1:
        quiet = layout.sharding in ("none", "optimizer")
        extra = _simulate_pass(model, cluster, layout, max_simulated, quiet) if quiet else (step, busy)
        step, busy = step + (layout.accumulation - 1) * extra[0], busy + (layout.accumulation - 1) * extra[1]
    world = layout.pipeline_size * layout.data_parallel_size
    sequences = layout.micro_batch_size * layout.num_micro_batches * layout.data_parallel_size * layout.accumulation
    tflops = model.step_flops(sequences) / step / world / 1e12
    points = simulated_micro_batches(layout, max_simulated)
    return Prediction(
        layout=layout,
        step_time=step,
        bubble_fraction=1 - busy / (layout.pipeline_size * step),
        peak_memory_bytes=memory,
        tokens_per_second=sequences * model.seq_len / step,
        tflops_per_gpu=tflops,
        mfu=tflops / cluster.gpu_tflops,
        simulated_micro_batches=layout.num_micro_batches if points is None else points[1],
    )


def lower_bound(cost: CostModel, layout: Layout) -> float:
    """No schedule of ``layout`` can be faster, whatever the communication: in each pass, rank ``r`` waits for the
    forward of the stages below ``r`` and computes all its micro-batches; after its last backward the backward of
    those stages runs. With batched weight gradients a ``W`` counts at the curve's peak efficiency (none can run
    faster) and may overlap that tail."""
    forward = list(cost.forward_time)  # type: ignore[arg-type]
    recompute = float(cost.activation_checkpointing)
    weight = [0.0] * len(forward)  # the W time per micro-batch; a backward's weight share is f of its 2 f
    if layout.weight_gradients == "batched":
        gain = 1.0 if cost.efficiency is None else cost.efficiency(cost.weight_grad_rows) / cost.efficiency.peak
        weight = [gain * f for f in forward]
    backward = [(1.0 + recompute + (w == 0)) * f for f, w in zip(forward, weight, strict=True)]  # without W
    p, m = layout.pipeline_size, layout.num_micro_batches

    def rank_pass(r: int) -> float:
        own = range(r, len(forward), p)
        until_last_backward = sum(forward[:r]) + m * sum(forward[s] + backward[s] for s in own)
        return until_last_backward + max(m * sum(weight[s] for s in own), sum(backward[:r]))

    return layout.accumulation * max(rank_pass(r) for r in range(p))


def layouts(
    model: ModelSpec,
    cluster: ClusterSpec,
    global_batch: int,
    schedules: Sequence[str],
    max_accumulation: int = 8,
    weight_gradients: Sequence[str] = PLAN_WEIGHT_GRADIENTS,
) -> Iterator[Layout]:
    """Every ``(schedule, P, L, D, micro-batch size, accumulation)`` that divides the model and the batch, with its
    rank layouts and weight-gradient modes (sharding and checkpointing are chosen in :func:`plan`)."""
    world = cluster.world_size
    for p in _divisors(world):
        d = world // p
        if global_batch % d or model.layers % p:
            continue
        for stages in _divisors(model.layers // p):
            for accumulation in _divisors(global_batch // d):
                for mbs in _divisors(global_batch // d // accumulation) if accumulation <= max_accumulation else ():
                    m = global_batch // d // accumulation // mbs
                    for name in schedules:
                        if (name == "gpipe" and stages > 1) or (name == "depth_first" and stages > 1 and m % p):
                            continue
                        for rank_layout in RANK_LAYOUTS if p > 1 and d > 1 else RANK_LAYOUTS[:1]:
                            for weights in weight_gradients:
                                yield Layout(
                                    *(name, p, stages, d, mbs, m),
                                    accumulation=accumulation,
                                    rank_layout=rank_layout,
                                    weight_gradients=weights,
                                )


def variants(base: Layout) -> list[Layout]:
    """``base`` with each sharding mode (ZeRO-2/3 not with batched weight gradients) and then the same with
    activation checkpointing: the order in which :func:`plan` tries them, cheapest in time first."""
    modes = SHARDING_MODES if base.data_parallel_size > 1 else SHARDING_MODES[:1]
    if base.weight_gradients == "batched":
        modes = tuple(m for m in modes if m in BATCHED_SHARDING)
    return [replace(base, sharding=s, activation_checkpointing=c) for c in (False, True) for s in modes]


@dataclass
class Plan:
    """The fitting layouts that were simulated, fastest first, and how many candidates there were."""

    results: list[Prediction]
    candidates: int


def plan(
    model: ModelSpec,
    cluster: ClusterSpec,
    global_batch: int,
    schedules: Sequence[str] = PLAN_SCHEDULES,
    *,
    top: int = 10,
    max_simulated: int = 24,
    max_accumulation: int = 8,
    all_variants: bool = False,
    weight_gradients: Sequence[str] = PLAN_WEIGHT_GRADIENTS,
) -> Plan:
    """Finds the ``top`` fastest layouts that fit in memory, and the fastest of each schedule.

    Each layout (with each of ``weight_gradients``) is tried with the variants of :func:`variants` in order: no
    sharding, ZeRO-1, ZeRO-2, ZeRO-3, then the same with activation checkpointing; only the first that fits is
    simulated (all with ``all_variants``). Candidates are
    visited by :func:`lower_bound`, and the search stops when no remaining one can enter the top ``top`` or beat the
    best of its schedule, so the answer is the same as simulating every candidate.
    """
    budget = cluster.gpu_memory_gb * GB * cluster.usable_memory
    candidates = []
    for index, base in enumerate(layouts(model, cluster, global_batch, schedules, max_accumulation, weight_gradients)):
        for variant, layout in enumerate(variants(base)):
            candidates.append((lower_bound(cost_model(model, cluster, layout), layout), index, variant, layout))
    candidates.sort(key=lambda c: c[:3])
    results: list[Prediction] = []
    times: list[float] = []
    best: dict[str, float] = {}
    fitted: set[int] = set()
    for bound, index, _, layout in candidates:
        nth = times[top - 1] if len(times) >= top else math.inf
        if bound >= nth and all(bound >= best.get(s, math.inf) for s in schedules):
            break
        if (bound >= nth and bound >= best.get(layout.schedule, math.inf)) or (index in fitted and not all_variants):
            continue
        if peak_memory(model, cluster, layout, max_simulated) > budget:
            continue
        fitted.add(index)
        results.append(predict(model, cluster, layout, max_simulated))
        bisect.insort(times, results[-1].step_time)
        best[layout.schedule] = min(best.get(layout.schedule, math.inf), results[-1].step_time)
    return Plan(sorted(results, key=lambda r: r.step_time), len(candidates))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["measure-efficiency"]:  # the only command that needs torch: imported on demand
        from lightning_bfpp.run.efficiency_measure import main as measure  # noqa: TID251 (runs torch)

        return measure(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m lightning_bfpp.plan",
        description=__doc__.split("\n\n")[0],
        epilog="python -m lightning_bfpp.plan measure-efficiency --help: measure a kernel efficiency curve here",
    )
    add_arguments(parser)
    group = parser.add_argument_group("search")
    batch = group.add_mutually_exclusive_group(required=True)
    batch.add_argument("--global-batch", type=int, nargs="+", help="global batch sizes in sequences")
    batch.add_argument("--batch-per-gpu", type=float, nargs="+", help="batch sizes per GPU (global = this x GPUs)")
    group.add_argument("--schedules", nargs="+", default=list(PLAN_SCHEDULES), choices=PLAN_SCHEDULES)
    group.add_argument("--top", type=int, default=10, help="rows of the ranked table per batch size")
    group.add_argument("--compare", action="store_true", help="also print the best layout per schedule (markdown)")
    group.add_argument("--plot", type=Path, help="write TFLOP/s per GPU vs batch size per GPU, per schedule (PNG)")
    group.add_argument("--max-simulated-micro-batches", type=int, default=24, help="extrapolate past max(this, 3P)")
    group.add_argument("--max-accumulation", type=int, default=8, help="most gradient accumulation passes A")
    group.add_argument("--all-variants", action="store_true", help="simulate every sharding/checkpointing that fits")
    group.add_argument(
        "--weight-gradients",
        nargs="+",
        default=list(PLAN_WEIGHT_GRADIENTS),
        choices=PLAN_WEIGHT_GRADIENTS,
        help="the strategy's weight_gradients modes to try (both; batched with ZeRO-0/1 only)",
    )
    args = parser.parse_args(argv)
    try:
        model, cluster = specs_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    world = cluster.world_size
    batches = args.global_batch or [round(b * world) for b in args.batch_per_gpu]
    per_gpu = args.batch_per_gpu or [b / world for b in batches]
    if any(b < 1 or abs(b - g * world) > 1e-6 for b, g in zip(batches, per_gpu, strict=True)):
        parser.error(f"every batch size per GPU times {world} GPUs must be a whole number of sequences >= 1")
    print(model.describe(), cluster.describe(), sep="\n")
    table: dict[float, dict[str, Prediction | None]] = {}
    for global_batch in batches:
        found = plan(
            model,
            cluster,
            global_batch,
            args.schedules,
            top=args.top,
            max_simulated=args.max_simulated_micro_batches,
            max_accumulation=args.max_accumulation,
            all_variants=args.all_variants,
            weight_gradients=args.weight_gradients,
        )
        print(
            f"\nglobal batch {global_batch} sequences ({global_batch / world:g} per GPU): {found.candidates} candidate "
            f"layouts, {len(found.results)} simulated (the others do not fit or cannot beat these)"
        )
        print(format_table(found.results, args.top) if found.results else "nothing fits: add GPUs or memory")
        print(format_settings([r.layout for r in found.results], cluster))
        table[global_batch / world] = best_per_schedule(found.results, args.schedules)
    if args.compare:
        print("\nbest predicted layout per schedule (TFLOP/s per GPU, MFU):\n" + format_comparison(table, world))
    if args.plot:
        print(f"\nwrote {plot_comparison(table, args.plot, f'{model.short()} on {world} GPUs')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
