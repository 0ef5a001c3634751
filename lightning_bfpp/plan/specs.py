"""What the planner plans for: a GPT-like model (:class:`ModelSpec`), a GPU cluster (:class:`ClusterSpec`), one
way to run the model on it (:class:`Layout`), its predicted step (:class:`Prediction`), and the simulator's costs of
a layout (:func:`cost_model`). Pure Python, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning_bfpp.plan.cost_model import CostModel
from lightning_bfpp.plan.efficiency import DEFAULT_GPU_CURVE, EfficiencyCurve

# Bytes per element under bf16-mixed as BFPPStrategy runs it: float32 parameters with Adam's two float32 moments,
# gathered by ZeRO-2/3 in bfloat16 (FSDP's parameter dtype), gradients kept and reduced in float32, stage outputs
# in bfloat16 (autocast's products).
PARAM_BYTES, GATHER_BYTES, GRAD_BYTES, OPTIMIZER_BYTES, ACTIVATION_BYTES = 4.0, 2.0, 4.0, 8.0, 2.0
RANK_LAYOUTS = ("dp_contiguous", "pp_contiguous")
PLAN_WEIGHT_GRADIENTS = ("per_micro_batch", "batched")  # BFPPStrategy's weight_gradients
BATCHED_SHARDING = ("none", "optimizer")  # the sharding modes batched weight gradients work with
LINEAR_OPERANDS_PER_TOKEN = 16  # inputs (7 h) and output gradients (9 h) of a block's four Linears, in units of h
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
    computes large micro-batches (MFU without bubble or communication), and ``efficiency`` the share of that a
    product over a given number of rows (tokens) reaches (:class:`~lightning_bfpp.plan.efficiency.EfficiencyCurve`);
    ``host_us`` the host's time to issue one action (the simulator's ``CostModel.host_time``, with a host that queues
    kernels ahead of the GPU)."""

    nodes: int = 8
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    gpu_tflops: float = 312.0
    compute_efficiency: float = 0.5
    intra_node_gbps: float = 200.0
    inter_node_gbps: float = 25.0
    latency_us: float = 10.0
    host_us: float = 0.0
    usable_memory: float = 0.9
    efficiency: EfficiencyCurve = field(default=DEFAULT_GPU_CURVE)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"--nodes and --gpus-per-node must be >= 1, got {self.nodes} and {self.gpus_per_node}")
        if not 0 < self.compute_efficiency <= 1 or not 0 < self.usable_memory <= 1:
            raise ValueError("--compute-efficiency and --usable-memory are fractions in (0, 1]")
        if self.host_us < 0:
            raise ValueError(f"--host-us must be >= 0 microseconds, got {self.host_us}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        return (
            f"cluster: {self.nodes} nodes x {self.gpus_per_node} GPUs, {self.gpu_memory_gb:g} GiB each "
            f"({self.usable_memory:.0%} usable), {self.gpu_tflops:g} TFLOP/s peak at {self.compute_efficiency:.0%} "
            f"efficiency, {self.intra_node_gbps:g} GB/s intra-node, {self.inter_node_gbps:g} GB/s inter-node per "
            f"GPU, {self.latency_us:g} us latency, {self.host_us:g} us of host time per action"
            f"\n{self.efficiency.describe()}"
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
    weight_gradients: str = "per_micro_batch"  # or "batched": one product per Linear and run of backwards (W)


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
    and last stage, the logits on the last; Adam under bf16-mixed (``PARAM_BYTES`` ... ``ACTIVATION_BYTES``).

    Compute times are divided by the cluster's efficiency at ``micro_batch_size x seq_len`` rows. With batched weight
    gradients each backward keeps its Linears' inputs and output gradients (``16 h`` per token and layer, plus the
    hidden input and the vocabulary-wide output gradient of the logits on the last stage) until the stage's ``W``."""
    stages = layout.pipeline_size * layout.stages_per_rank
    if model.layers % stages:
        raise ValueError(
            f"{model.layers} layers do not split into P x L = {stages} equal stages; choose P x L dividing it"
        )
    per_stage, mbs, rate = model.layers // stages, layout.micro_batch_size, cluster.gpu_tflops * 1e12
    rows, curve = mbs * model.seq_len, cluster.efficiency
    if model.layer_forward_s:  # profiled for one sequence: rescale to the micro-batch's rows
        layer_time = model.layer_forward_s * curve(model.seq_len) / curve(rows)
    else:
        layer_time = model.layer_flops / (rate * cluster.compute_efficiency * curve(rows))
    head_time = layer_time * model.head_flops / model.layer_flops
    head_operands = model.hidden + model.vocab  # the logits' input and output gradient, per token
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
        weight_grad_bytes=[
            ACTIVATION_BYTES * rows * (per_stage * LINEAR_OPERANDS_PER_TOKEN * model.hidden + last[s] * head_operands)
            for s in range(stages)
        ]
        if layout.weight_gradients == "batched"
        else 0.0,
        weight_grad_rows=rows,
        efficiency=curve,
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
        host_time=cluster.host_us * 1e-6,
        host_blocking=False,  # a GPU host queues kernels ahead of the device
    )
