"""Ranks pipeline layouts of a GPT-like model on a GPU cluster by simulated throughput within memory.

    python -m lightning_bfpp.plan --params 52e9 --nodes 8 --gpus-per-node 8 --batch-per-gpu 0.5 1 2 4 8 --compare

For every global batch size it enumerates ``P`` (pipeline ranks), ``L`` (stages per rank), the micro-batch size (so
``M``), gradient accumulation ``A``, ``D = GPUs / P``, the schedule, the sharding mode, activation checkpointing and
the rank layout; keeps what fits in memory (:func:`lightning_bfpp.simulate.estimate_memory`) and ranks it by the step
time of :func:`lightning_bfpp.simulate.simulate`, visiting candidates by a lower bound so that most need no
simulation. Every number is a prediction of that cost model, not a measurement.
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

from lightning_bfpp.schedule import SCHEDULES, Schedule
from lightning_bfpp.simulate import SHARDING_MODES, CostModel, estimate_memory, resident_bytes, simulate

PLAN_SCHEDULES = ("breadth_first", "depth_first", "gpipe")
# Bytes per element under bf16-mixed as BFPPStrategy runs it: float32 parameters with Adam's two float32 moments,
# gathered by ZeRO-2/3 in bfloat16 (FSDP's parameter dtype), gradients kept and reduced in float32, stage outputs
# in bfloat16 (autocast's products).
PARAM_BYTES, GATHER_BYTES, GRAD_BYTES, OPTIMIZER_BYTES, ACTIVATION_BYTES = 4.0, 2.0, 4.0, 8.0, 2.0
RANK_LAYOUTS = ("dp_contiguous", "pp_contiguous")
GB = 1024**3


@dataclass(frozen=True)
class ModelSpec:
    """A GPT-like decoder: ``layers`` blocks of ``12 h^2 + 13 h`` parameters, learned positions and a vocabulary
    embedding that the last stage also holds (to compute the logits).

    Arguments:
        layer_forward_s: measured forward time of one layer for one sequence on one GPU (a profile); None:
            derived from the FLOPs and the cluster's ``gpu_tflops * compute_efficiency``.
        layer_activation_bytes: measured memory one layer keeps per sequence for its backward; None: ``34 s h``
            bytes (bf16, Korthikanti et al. 2022), plus ``5 a s^2`` without flash attention.
    """

    layers: int
    hidden: int
    seq_len: int = 1024
    vocab: int = 51200
    heads: int = 0  # 0: hidden // 128
    flash_attention: bool = True
    layer_forward_s: float | None = None
    layer_activation_bytes: float | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "seq_len", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_params(cls, params: float, layers: int | None = None, **kwargs: object) -> ModelSpec:
        """The shape with ``params`` parameters in its blocks: ``hidden`` from ``12 layers hidden^2 = params``
        (a multiple of 128), and without ``layers`` the aspect ratio ``hidden = 128 layers``."""
        layers = layers or max(1, round((params / (12 * 128**2)) ** (1 / 3)))
        hidden = max(128, round((params / (12 * layers)) ** 0.5 / 128) * 128)
        return cls(layers=layers, hidden=hidden, **kwargs)  # type: ignore[arg-type]

    @property
    def layer_params(self) -> int:
        return 12 * self.hidden**2 + 13 * self.hidden

    @property
    def embedding_params(self) -> int:
        return (self.vocab + self.seq_len) * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params

    @property
    def layer_flops(self) -> float:
        """Forward FLOPs of one layer for one sequence: the matrix products and the attention scores."""
        return self.seq_len * (24 * self.hidden**2 + 4 * self.seq_len * self.hidden)

    @property
    def head_flops(self) -> float:
        return 2.0 * self.seq_len * self.vocab * self.hidden

    def step_flops(self, sequences: int) -> float:
        """Model FLOPs (forward and backward, no recomputation) of a step over ``sequences``."""
        return 3 * (self.layers * self.layer_flops + self.head_flops) * sequences

    def activation_bytes(self) -> float:
        if self.layer_activation_bytes is not None:
            return self.layer_activation_bytes
        attention = 0 if self.flash_attention else 5 * (self.heads or self.hidden // 128) * self.seq_len**2
        return 34.0 * self.seq_len * self.hidden + attention

    def short(self) -> str:
        return f"{self.params / 1e9:.1f}B GPT"

    def describe(self) -> str:
        return (
            f"model: {self.params / 1e9:.2f}B parameters, {self.layers} layers, hidden {self.hidden}, sequence "
            f"{self.seq_len}, vocabulary {self.vocab}, {self.activation_bytes() / 2**20:.0f} MiB of activations per "
            f"layer and sequence{'' if self.flash_attention else ' (no flash attention)'}"
        )


@dataclass(frozen=True)
class ClusterSpec:
    """GPUs and links. Bandwidths are per GPU in GB/s (1e9 bytes/s): ``intra_node_gbps`` between GPUs of a node,
    ``inter_node_gbps`` across nodes; ``compute_efficiency`` is the share of ``gpu_tflops`` a stage reaches while it
    computes (MFU without bubble or communication)."""

    nodes: int = 8
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    gpu_tflops: float = 312.0
    compute_efficiency: float = 0.5
    intra_node_gbps: float = 200.0
    inter_node_gbps: float = 25.0
    latency_us: float = 10.0
    usable_memory: float = 0.9

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"--nodes and --gpus-per-node must be >= 1, got {self.nodes} and {self.gpus_per_node}")
        if not 0 < self.compute_efficiency <= 1 or not 0 < self.usable_memory <= 1:
            raise ValueError("--compute-efficiency and --usable-memory are fractions in (0, 1]")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        return (
            f"cluster: {self.nodes} nodes x {self.gpus_per_node} GPUs, {self.gpu_memory_gb:g} GiB each "
            f"({self.usable_memory:.0%} usable), {self.gpu_tflops:g} TFLOP/s peak at {self.compute_efficiency:.0%} "
            f"efficiency, {self.intra_node_gbps:g} GB/s intra-node, {self.inter_node_gbps:g} GB/s inter-node per "
            f"GPU, {self.latency_us:g} us latency"
        )


@dataclass(frozen=True)
class Layout:
    """One way to run the model: ``P x L`` stages, ``D`` replicas, ``M`` micro-batches of ``micro_batch_size``."""

    schedule: str
    pipeline_size: int
    stages_per_rank: int
    data_parallel_size: int
    micro_batch_size: int
    num_micro_batches: int
    sharding: str = "none"
    activation_checkpointing: bool = False
    accumulation: int = 1  # passes of M micro-batches per optimizer step (accumulate_grad_batches)
    rank_layout: str = "dp_contiguous"


@dataclass(frozen=True)
class Prediction:
    """The simulated step of a layout; ``simulated_micro_batches < num_micro_batches`` means extrapolated."""

    layout: Layout
    step_time: float
    bubble_fraction: float
    peak_memory_bytes: float
    tokens_per_second: float
    tflops_per_gpu: float
    mfu: float
    simulated_micro_batches: int


def _bandwidths(cluster: ClusterSpec, layout: Layout) -> tuple[list[float], float]:
    """Bytes/s of each pipeline link ``r -> r+1`` and of the data-parallel rings, from where the ranks sit."""
    p, d, per_node = layout.pipeline_size, layout.data_parallel_size, cluster.gpus_per_node

    def node(pp: int, dp: int) -> int:
        return (pp * d + dp if layout.rank_layout == "dp_contiguous" else dp * p + pp) // per_node

    def speed(intra: bool) -> float:
        return 1e9 * (cluster.intra_node_gbps if intra else cluster.inter_node_gbps)

    links = [speed(all(node(r, i) == node((r + 1) % p, i) for i in range(d))) for r in range(p)]
    return links, speed(all(node(r, i) == node(r, 0) for r in range(p) for i in range(d)))


def cost_model(model: ModelSpec, cluster: ClusterSpec, layout: Layout) -> CostModel:
    """The simulator's costs of ``layout``: layers split evenly over the ``P x L`` stages, the embedding on the first
    and last stage, the logits on the last; Adam under bf16-mixed (``PARAM_BYTES`` ... ``ACTIVATION_BYTES``)."""
    stages = layout.pipeline_size * layout.stages_per_rank
    if model.layers % stages:
        raise ValueError(
            f"{model.layers} layers do not split into P x L = {stages} equal stages; choose P x L dividing it"
        )
    per_stage, mbs, rate = model.layers // stages, layout.micro_batch_size, cluster.gpu_tflops * 1e12
    layer_time = model.layer_forward_s or model.layer_flops / (rate * cluster.compute_efficiency)
    head_time = layer_time * model.head_flops / model.layer_flops
    first, last = [float(s == 0) for s in range(stages)], [float(s == stages - 1) for s in range(stages)]
    links, dp_bandwidth = _bandwidths(cluster, layout)
    dp = layout.data_parallel_size
    return CostModel(
        forward_time=[mbs * (per_stage * layer_time + head_time * last[s]) for s in range(stages)],
        activation_bytes=[
            mbs * (per_stage * model.activation_bytes() + 4.0 * model.seq_len * model.vocab * last[s])
            for s in range(stages)
        ],
        boundary_bytes=ACTIVATION_BYTES * mbs * model.seq_len * model.hidden,
        p2p_latency=cluster.latency_us * 1e-6,
        p2p_bandwidth=links,
        stage_params=[
            per_stage * model.layer_params + model.embedding_params * first[s] + model.vocab * model.hidden * last[s]
            for s in range(stages)
        ],
        dp_size=dp,
        dp_bandwidth=dp_bandwidth,
        dp_latency=2 * (dp - 1) * cluster.latency_us * 1e-6,
        sharding=layout.sharding,
        param_bytes=PARAM_BYTES,
        gather_bytes=GATHER_BYTES,
        grad_bytes=GRAD_BYTES,
        optimizer_bytes=OPTIMIZER_BYTES,
        activation_checkpointing=layout.activation_checkpointing,
    )


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
        ("usable_memory", float, "share of the GPU memory the layout may use"),
    ):
        default = getattr(defaults, name)
        cluster.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=f"{help_text} ({default})")


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
    cluster = ClusterSpec(**{f: getattr(args, f) for f in ClusterSpec.__dataclass_fields__})
    return model, cluster


@functools.lru_cache(maxsize=4096)
def _schedule(name: str, pipeline_size: int, stages_per_rank: int, num_micro_batches: int) -> Schedule:
    # The built-in generators are validated by the test suite; validating here too would double the planner's time.
    return SCHEDULES[name](pipeline_size, stages_per_rank, num_micro_batches)


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
            _schedule(layout.schedule, layout.pipeline_size, layout.stages_per_rank, m),
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
        schedule = _schedule(layout.schedule, layout.pipeline_size, layout.stages_per_rank, m)
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
    forward of the stages below ``r``, computes all its micro-batches, and then the backward of those stages runs."""
    forward = list(cost.forward_time)  # type: ignore[arg-type]
    backward = [(3.0 if cost.activation_checkpointing else 2.0) * f for f in forward]
    p, m = layout.pipeline_size, layout.num_micro_batches
    per_pass = max(
        sum(forward[:r]) + sum(backward[:r]) + m * sum(forward[s] + backward[s] for s in range(r, len(forward), p))
        for r in range(p)
    )
    return layout.accumulation * per_pass


def layouts(
    model: ModelSpec, cluster: ClusterSpec, global_batch: int, schedules: Sequence[str], max_accumulation: int = 8
) -> Iterator[Layout]:
    """Every ``(schedule, P, L, D, micro-batch size, accumulation)`` that divides the model and the batch, with its
    rank layouts (sharding and checkpointing are chosen in :func:`plan`)."""
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
                            yield Layout(name, p, stages, d, mbs, m, accumulation=accumulation, rank_layout=rank_layout)


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
) -> Plan:
    """Finds the ``top`` fastest layouts that fit in memory, and the fastest of each schedule.

    Each layout is tried with the variants in order of cost: no sharding, ZeRO-1, ZeRO-2, ZeRO-3, then the same with
    activation checkpointing; only the first that fits is simulated (all with ``all_variants``). Candidates are
    visited by :func:`lower_bound`, and the search stops when no remaining one can enter the top ``top`` or beat the
    best of its schedule, so the answer is the same as simulating every candidate.
    """
    budget = cluster.gpu_memory_gb * GB * cluster.usable_memory
    candidates = []
    for index, base in enumerate(layouts(model, cluster, global_batch, schedules, max_accumulation)):
        modes = SHARDING_MODES if base.data_parallel_size > 1 else SHARDING_MODES[:1]
        for variant, (checkpointing, sharding) in enumerate((c, s) for c in (False, True) for s in modes):
            layout = replace(base, sharding=sharding, activation_checkpointing=checkpointing)
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


HEADER = (
    f"{'schedule':13s} {'P':>3s} {'L':>3s} {'D':>3s} {'mbs':>3s} {'M':>4s}  {'A':>2s} {'sharding':9s} {'ckpt':4s} "
    f"{'rank layout':13s} {'step ms':>8s} {'tokens/s':>9s} {'TFLOP/s/GPU':>11s} {'MFU':>5s} {'bubble':>6s} {'GiB':>5s}"
)


def format_row(r: Prediction) -> str:
    lay = r.layout
    extrapolated = "*" if r.simulated_micro_batches < lay.num_micro_batches else " "
    return (
        f"{lay.schedule:13s} {lay.pipeline_size:3d} {lay.stages_per_rank:3d} {lay.data_parallel_size:3d} "
        f"{lay.micro_batch_size:3d} {lay.num_micro_batches:4d}{extrapolated} {lay.accumulation:2d} {lay.sharding:9s} "
        f"{'yes' if lay.activation_checkpointing else 'no':4s} {lay.rank_layout:13s} {r.step_time * 1e3:8.1f} "
        f"{r.tokens_per_second:9.0f} {r.tflops_per_gpu:11.1f} {r.mfu:5.1%} {r.bubble_fraction:6.1%} "
        f"{r.peak_memory_bytes / GB:5.1f}"
    )


def format_table(results: Sequence[Prediction], top: int) -> str:
    """The ``top`` fastest layouts as a text table."""
    lines = [HEADER, *(format_row(r) for r in results[:top])]
    if any(r.simulated_micro_batches < r.layout.num_micro_batches for r in results[:top]):
        lines.append("* M too large to simulate step by step: extrapolated linearly from two smaller multiples of P")
    return "\n".join(lines)


def best_per_schedule(results: Sequence[Prediction], schedules: Sequence[str]) -> dict[str, Prediction | None]:
    return {s: next((r for r in results if r.layout.schedule == s), None) for s in schedules}


def _cell(r: Prediction | None) -> str:
    if r is None:
        return "does not fit"
    lay = r.layout
    return (
        f"**{r.tflops_per_gpu:.0f}** ({r.mfu:.0%}, {r.peak_memory_bytes / GB:.0f} GiB): P={lay.pipeline_size} "
        f"L={lay.stages_per_rank} D={lay.data_parallel_size} mbs={lay.micro_batch_size} M={lay.num_micro_batches}"
        f"{f' A={lay.accumulation}' if lay.accumulation > 1 else ''} {lay.sharding}"
        f"{' ckpt' if lay.activation_checkpointing else ''}{' pp_contiguous' if lay.rank_layout[0] == 'p' else ''}"
    )


def format_comparison(table: dict[float, dict[str, Prediction | None]], world: int) -> str:
    """Markdown: per batch size per GPU, the predicted TFLOP/s per GPU (MFU, memory) and layout of each schedule;
    the best column lists every schedule within 0.5% of the fastest."""
    schedules = list(next(iter(table.values()))) if table else []
    lines = [
        "| batch/GPU | global batch | " + " | ".join(schedules) + " | best |",
        "| ---: | ---: | " + " | ".join("---" for _ in schedules) + " | --- |",
    ]
    for per_gpu, best in table.items():
        found = [r for r in best.values() if r is not None]
        top = max((r.tflops_per_gpu for r in found), default=0.0)
        winner = " = ".join(r.layout.schedule for r in found if r.tflops_per_gpu >= 0.995 * top) or "-"
        cells = " | ".join(_cell(best[s]) for s in schedules)
        lines.append(f"| {per_gpu:g} | {round(per_gpu * world)} | {cells} | {winner} |")
    return "\n".join(lines)


def plot_comparison(table: dict[float, dict[str, Prediction | None]], path: str | Path, title: str = "") -> Path:
    """Best predicted TFLOP/s per GPU against the batch size per GPU, one line per schedule (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError('--plot needs matplotlib: pip install -e ".[plot]"') from error
    fig, ax = plt.subplots(figsize=(7, 4.5))
    schedules = list(next(iter(table.values()))) if table else []
    for s in schedules:
        points = [(b, best[s].tflops_per_gpu) for b, best in table.items() if best[s] is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=s)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(table), [f"{b:g}" for b in table])
    ax.set_xlabel("batch size per GPU (sequences)")
    ax.set_ylabel("predicted TFLOP/s per GPU (best layout)")
    ax.set_title(title or "predicted throughput by schedule")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_bfpp.plan", description=__doc__.split("\n\n")[0])
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
        )
        print(
            f"\nglobal batch {global_batch} sequences ({global_batch / world:g} per GPU): {found.candidates} candidate "
            f"layouts, {len(found.results)} simulated (the others do not fit or cannot beat these)"
        )
        print(format_table(found.results, args.top) if found.results else "nothing fits: add GPUs or memory")
        table[global_batch / world] = best_per_schedule(found.results, args.schedules)
    if args.compare:
        print("\nbest predicted layout per schedule (TFLOP/s per GPU, MFU):\n" + format_comparison(table, world))
    if args.plot:
        print(f"\nwrote {plot_comparison(table, args.plot, f'{model.short()} on {world} GPUs')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
