"""The real strategy and executor on 8 to 16 processes with emulated kernels, against the simulator and torch.

Each layer's forward and backward sleep a prescribed time (the CPU stays free), on real activation tensors of a
prescribed size; the transfers between stages and the data-parallel gradient reductions are real gloo traffic. Every
case trains ``BFPPStrategy`` under the Lightning Trainer (P = 8, 32 layers, L stages per rank, M micro-batches, D
replicas) and is compared with :func:`lightning_bfpp.plan.simulate.simulate` of the same schedule, given the same kernel
times, the measured gloo point-to-point latency and bandwidth, and the measured all-reduce time of a stage's
gradients. The same emulated stages also run under ``torch.distributed.pipelining``'s ``ScheduleLoopedBFS`` and
``ScheduleInterleaved1F1B`` (D = 1).

    python benchmarks/emulated_cluster.py            # P=8, L in 1 2 4, M in 4 8 16, D in 1 2
    python benchmarks/emulated_cluster.py --quick    # P=8, L in 1 2, M in 4 8, D = 1: a few minutes

All ranks share this machine's cores: the kernels sleep, so the CPU time is the host work alone (Python, Lightning,
gloo), which the simulator counts as free. The last line is ``emulated_ranks=<n> measured_over_simulated=<median>
worst_case_error=<max relative error> bf_over_df_small_batch=<breadth-first / depth-first step time at M < P>
vs_torch_loopedbfs=<breadth-first / torch LoopedBFS step time, median over the D = 1 cases>``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from bench_launch import bounded_run  # bounded; at the bound it kills every process the launch started

PIPELINE, LAYERS, WARMUP = 8, 32, 2
SCHEDULES = ("breadth_first", "depth_first", "gpipe")
TORCH_SCHEDULES = ("torch_loopedbfs", "torch_interleaved1f1b")


SLEPT = {"forward": [0.0, 0], "backward": [0.0, 0]}  # seconds and count of this process's emulated kernels


def _sleep(kind: str, seconds: float) -> None:
    start = time.perf_counter()
    time.sleep(seconds)
    SLEPT[kind][0] += time.perf_counter() - start
    SLEPT[kind][1] += 1


class _Sleep(torch.autograd.Function):
    """Identity on the activations that waits ``forward_s`` / ``backward_s`` without using the CPU."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, forward_s: float, backward_s: float) -> Tensor:
        ctx.backward_s = backward_s
        ctx.weight_shape = weight.shape
        _sleep("forward", forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        _sleep("backward", ctx.backward_s)
        return grad, grad.new_zeros(ctx.weight_shape), None, None


def executed_kernel_ms() -> dict[str, float]:
    """The mean time one emulated layer's forward and backward took, over every rank (a sleep wakes up late on a
    loaded machine), since the last call."""
    mine = {kind: (total, count) for kind, (total, count) in SLEPT.items()}
    for kind in SLEPT:
        SLEPT[kind] = [0.0, 0]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {kind: 1e3 * sum(g[kind][0] for g in gathered) / max(1, sum(g[kind][1] for g in gathered)) for kind in mine}


class EmulatedLayer(nn.Module):
    """A layer whose kernels take a prescribed time; ``params`` parameters give its gradients a real size."""

    def __init__(self, params: int, forward_s: float, backward_s: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(params))
        self.forward_s, self.backward_s = forward_s, backward_s

    def forward(self, x: Tensor) -> Tensor:
        return _Sleep.apply(x, self.weight, self.forward_s, self.backward_s)


def make_layers(cfg: dict[str, Any]) -> list[nn.Module]:
    return [
        EmulatedLayer(cfg["layer_params"], cfg["forward_ms"] * 1e-3, cfg["backward_ms"] * 1e-3) for _ in range(LAYERS)
    ]


def make_batch(cfg: dict[str, Any], micro_batches: int) -> tuple[Tensor, Tensor]:
    x = torch.randn(micro_batches * cfg["rows"], cfg["width"])
    return x, torch.zeros_like(x)


# ------------------------------------------------------------------------------------------------ inside a rank
def measure_links(dp: int) -> dict[str, float]:
    """gloo ping-pong latency and bandwidth between global ranks 0 and 1, and the all-reduce time of one layer's
    gradients over ``dp`` ranks (0 when ``dp == 1``); medians, as seen from rank 0."""
    rank, cfg = dist.get_rank(), CONFIG
    out: dict[str, float] = {}
    for name, numel in (("small", 1), ("large", cfg["rows"] * cfg["width"])):
        buf, trips = torch.zeros(numel), []
        dist.barrier()
        for _ in range(100 if rank < 2 else 0):  # the median one-way time: a loaded machine has long outliers
            start = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            trips.append((time.perf_counter() - start) / 2)
        out[name] = statistics.median(trips) if trips else 0.0
    out["allreduce"] = 0.0
    if dp > 1:
        groups = [dist.new_group(list(range(r, r + dp))) for r in range(0, dist.get_world_size(), dp)]
        group = groups[rank // dp]
        grads = torch.zeros(cfg["layer_params"])
        times = []
        dist.barrier()
        for _ in range(20):
            start = time.perf_counter()
            dist.all_reduce(grads, group=group)
            times.append(time.perf_counter() - start)
        out["allreduce"] = statistics.median(times)
    return {
        "latency": out["small"],
        "bandwidth": (cfg["rows"] * cfg["width"] - 1) * 4 / max(out["large"] - out["small"], 1e-9),
        "allreduce": out["allreduce"],
    }


def run_bfpp(
    schedule: str, stages_per_rank: int, micro_batches: int, dp: int, timeline: str | None
) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU (rank 0's process) seconds of the timed steps."""
    import lightning.pytorch as pl

    from lightning_bfpp import BFPPStrategy, PipelineModule

    cfg = CONFIG

    class Model(PipelineModule):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(make_layers(cfg))

        def pipeline_layers(self) -> nn.ModuleList:
            return self.layers

        def pipeline_input(self, batch: Any) -> Tensor:
            return batch[0]

        def pipeline_loss(self, outputs: Tensor, batch: Any) -> Tensor:
            return outputs.mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class StepStarts(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.cpu: list[float] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self.starts.append(time.perf_counter())
            self.cpu.append(time.process_time())

    strategy = BFPPStrategy(
        pipeline_parallel_size=PIPELINE,
        stages_per_rank=stages_per_rank,
        micro_batches=micro_batches,
        schedule=schedule,
        timeout=timedelta(seconds=300),
        timeline_dir=timeline,
        timeline_batches=(WARMUP, WARMUP + 1),
    )
    timer = StepStarts()
    steps = cfg["steps"] + WARMUP + 1
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=PIPELINE * dp,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        use_distributed_sampler=False,
    )
    data = [make_batch(cfg, micro_batches) for _ in range(steps)]
    trainer.fit(Model(), train_dataloaders=DataLoader(data, batch_size=None))
    wall = [b - a for a, b in zip(timer.starts[WARMUP:], timer.starts[WARMUP + 1 :], strict=False)]
    return wall, [b - a for a, b in zip(timer.cpu[WARMUP:], timer.cpu[WARMUP + 1 :], strict=False)]


def run_torch(name: str, stages_per_rank: int, micro_batches: int) -> list[float]:
    from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B, ScheduleLoopedBFS

    cfg = CONFIG
    rank, world = dist.get_rank(), dist.get_world_size()
    layers = make_layers(cfg)
    num_stages = world * stages_per_rank
    size = LAYERS // num_stages
    stages, params = [], []
    for s in range(rank, num_stages, world):
        module = nn.Sequential(*layers[s * size : (s + 1) * size])
        params += list(module.parameters())
        stages.append(PipelineStage(module, s, num_stages, torch.device("cpu")))
    schedule_cls = ScheduleLoopedBFS if name == "torch_loopedbfs" else ScheduleInterleaved1F1B
    schedule = schedule_cls(stages, n_microbatches=micro_batches, loss_fn=lambda out, target: out.mean())
    optimizer = torch.optim.SGD(params, lr=1e-3)
    starts = []
    for _ in range(cfg["steps"] + WARMUP + 1):
        x, y = make_batch(cfg, micro_batches)
        starts.append(time.perf_counter())
        optimizer.zero_grad()
        if rank == 0:
            schedule.step(x, target=y)
        elif rank == world - 1:
            schedule.step(target=y)
        else:
            schedule.step()
        optimizer.step()
    dist.barrier()
    return [b - a for a, b in zip(starts[WARMUP:], starts[WARMUP + 1 :], strict=False)]


def rank_main(cases: list[dict[str, Any]], dp: int) -> None:
    """Runs every case in this process group (one launch); rank 0 prints one RESULT line per case."""
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank = dist.get_rank()
    links = measure_links(dp)
    if rank == 0:
        print("LINKS " + json.dumps(links), flush=True)
    for case in [{**cases[0], "warm_up": True}, *cases]:  # the first fit of a launch is slower: not counted
        executed_kernel_ms()
        try:
            result: dict[str, Any] = dict(case)
            if case["schedule"].startswith("torch"):
                result["times"] = run_torch(case["schedule"], case["L"], case["M"])
            else:
                timeline = None if case.get("warm_up") else case.get("timeline")
                result["times"], result["cpu"] = run_bfpp(case["schedule"], case["L"], case["M"], dp, timeline)
            result["executed_ms"] = executed_kernel_ms()
        except Exception as error:  # a schedule a peer does not support: recorded, the launch goes on
            result = {**case, "error": f"{type(error).__name__}: {error}"[:300]}
            dist.barrier()
        if rank == 0 and not case.get("warm_up"):
            print("RESULT " + json.dumps(result), flush=True)


CONFIG: dict[str, Any] = {}


# ------------------------------------------------------------------------------------------------ orchestration
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cases: list[dict[str, Any]], dp: int, cfg: dict[str, Any], timeout: float) -> tuple[dict, list[dict]]:
    """One launch of ``P * dp`` processes running ``cases``; returns the measured links and one result per case."""
    world = PIPELINE * dp
    spec = json.dumps({"cases": cases, "dp": dp, "cfg": cfg})
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", f"--master-port={free_port()}"]
    cmd += [__file__, "--rank-spec", spec]
    code, output = bounded_run(cmd, timeout)
    lines = output.splitlines()
    results = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
    links = [json.loads(line[6:]) for line in lines if line.startswith("LINKS ")]
    if code != 0 or not links:
        raise RuntimeError(f"launch of {world} ranks failed ({code}):\n{output[-8000:]}")
    return links[0], results


def simulated(case: dict[str, Any], dp: int, links: dict[str, float], cfg: dict[str, Any], events: bool = False) -> Any:
    """:func:`~lightning_bfpp.plan.simulate.simulate` of ``case`` with ``cfg``'s kernel times and the measured links."""
    from lightning_bfpp.plan.schedule import build_schedule
    from lightning_bfpp.plan.simulate import CostModel, simulate

    layers_per_stage = LAYERS // (PIPELINE * case["L"])
    cost = CostModel(
        forward_time=layers_per_stage * cfg["forward_ms"] * 1e-3,
        backward_time=layers_per_stage * cfg["backward_ms"] * 1e-3,
        boundary_bytes=cfg["rows"] * cfg["width"] * 4,
        p2p_latency=links["latency"],
        p2p_bandwidth=links["bandwidth"],
        stage_params=layers_per_stage * cfg["layer_params"],
        dp_size=dp,
        dp_latency=layers_per_stage * links["allreduce"],  # with infinite bandwidth the all-reduce takes the latency
        grad_bytes=4,
    )
    schedule = build_schedule(case["schedule"], PIPELINE, case["L"], case["M"])
    return simulate(schedule, cost, record_events=events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="L in 1 2, M in 4 8, D = 1")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after 2 warm-up steps)")
    parser.add_argument("--forward-ms", type=float, default=2.0, help="emulated forward time of one layer")
    parser.add_argument("--backward-ms", type=float, default=4.0, help="emulated backward time of one layer")
    parser.add_argument("--rows", type=int, default=4, help="rows of one micro-batch's activation")
    parser.add_argument("--width", type=int, default=1024, help="columns of the activation (float32)")
    parser.add_argument("--layer-params", type=int, default=65536, help="parameters of one layer")
    parser.add_argument("--timeline", default=None, help="write the executed timeline of breadth-first L=2 M=8 here")
    parser.add_argument("--rank-spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.rank_spec is not None:
        spec = json.loads(args.rank_spec)
        CONFIG.update(spec["cfg"])
        rank_main(spec["cases"], spec["dp"])
        return
    cfg = {
        "steps": args.steps,
        "forward_ms": args.forward_ms,
        "backward_ms": args.backward_ms,
        "rows": args.rows,
        "width": args.width,
        "layer_params": args.layer_params,
    }
    Ls, Ms, Ds = ((1, 2), (4, 8), (1,)) if args.quick else ((1, 2, 4), (4, 8, 16), (1, 2))
    rows: list[dict[str, Any]] = []
    for dp in Ds:
        cases = []
        for L, M in itertools.product(Ls, Ms):
            names = SCHEDULES + (TORCH_SCHEDULES if dp == 1 else ())
            for name in names:
                if (name == "gpipe" and L > 1) or (name == "depth_first" and L > 1 and M % PIPELINE):
                    continue  # GPipe: one stage per rank; interleaved depth-first: M a multiple of P
                case: dict[str, Any] = {"schedule": name, "L": L, "M": M}
                if args.timeline and dp == 1 and name == "breadth_first" and L == 2 and M == 8:
                    case["timeline"] = str(Path(args.timeline).resolve())
                cases.append(case)
        start = time.perf_counter()
        links, results = launch(cases, dp, cfg, timeout=3600)
        print(
            f"D={dp}: {PIPELINE * dp} ranks, {len(cases)} cases in {time.perf_counter() - start:.0f} s; gloo latency "
            f"{links['latency'] * 1e6:.0f} us, bandwidth {links['bandwidth'] / 1e9:.2f} GB/s, layer all-reduce "
            f"{links['allreduce'] * 1e6:.0f} us",
            flush=True,
        )
        for result in results:
            result["D"] = dp
            if "error" not in result:
                result["measured"] = statistics.median(result["times"])
                if not result["schedule"].startswith("torch"):
                    result["simulated"] = simulated(result, dp, links, cfg).step_time
                    executed = result["executed_ms"]
                    as_run = {**cfg, "forward_ms": executed["forward"], "backward_ms": executed["backward"]}
                    result["simulated_as_run"] = simulated(result, dp, links, as_run).step_time
                    result["cpu_step"] = statistics.median(result["cpu"])
                if "timeline" in result:
                    from lightning_bfpp.plan.simulate import plot_timeline

                    title = f"simulated breadth_first: P={PIPELINE} L={result['L']} M={result['M']}"
                    events = simulated(result, dp, links, cfg, events=True).events
                    plot_timeline(events, Path(result["timeline"]) / "simulated.png", title)
            rows.append(result)
    print(
        f"\n{'schedule':22s} {'L':>2s} {'M':>3s} {'D':>2s} {'measured ms':>12s} {'simulated ms':>13s} {'ratio':>6s}"
        f" {'extra ms/action':>16s} {'rank 0 CPU ms':>14s} {'kernels as run F/B ms':>22s} {'ratio as run':>13s}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['schedule']:22s} {r['L']:2d} {r['M']:3d} {r['D']:2d}  not run: {r['error'][:80]}")
            continue
        line = f"{r['schedule']:22s} {r['L']:2d} {r['M']:3d} {r['D']:2d} {r['measured'] * 1e3:12.1f}"
        if "simulated" in r:
            extra = (r["measured"] - r["simulated"]) / (2 * r["L"] * r["M"])  # per compute action of a rank
            line += f" {r['simulated'] * 1e3:13.1f} {r['measured'] / r['simulated']:6.3f} {extra * 1e3:16.2f}"
            line += f" {r['cpu_step'] * 1e3:14.1f}"
            executed = r["executed_ms"]
            line += f" {executed['forward']:10.2f} / {executed['backward']:<9.2f}"
            line += f" {r['measured'] / r['simulated_as_run']:13.3f}"
        print(line)
    ok = [r for r in rows if "simulated" in r]
    ratios = [r["measured"] / r["simulated"] for r in ok]
    worst = max(abs(x - 1) for x in ratios)

    def step(schedule: str, L: int, M: int, D: int) -> float | None:
        for r in rows:
            if (r["schedule"], r["L"], r["M"], r["D"]) == (schedule, L, M, D) and "measured" in r:
                return r["measured"]
        return None

    def ratio_over(other: str, keep: Any) -> float:
        pairs = []
        for r in rows:
            if r["schedule"] == "breadth_first" and "measured" in r and keep(r):
                theirs = step(other, r["L"], r["M"], r["D"])
                if theirs:
                    pairs.append(r["measured"] / theirs)
        return statistics.median(pairs) if pairs else float("nan")

    as_run = [r["measured"] / r["simulated_as_run"] for r in ok]
    fwd, bwd = (statistics.median(r["executed_ms"][kind] for r in ok) for kind in ("forward", "backward"))
    print(
        f"one emulated layer as run, median over cases: forward {fwd:.2f} ms (prescribed {cfg['forward_ms']}),"
        f" backward {bwd:.2f} ms (prescribed {cfg['backward_ms']})"
    )
    print(
        f"measured over simulated with the kernels as run: median {statistics.median(as_run):.3f},"
        f" worst error {max(abs(x - 1) for x in as_run):.3f}"
    )
    agree, pairs = _ranking(ok)
    print(f"schedule pairs the simulator separates by more than 5%: the measured order agrees in {agree} of {pairs}")
    bf_df = ratio_over("depth_first", lambda r: r["M"] < PIPELINE)
    vs_torch = ratio_over("torch_loopedbfs", lambda r: r["D"] == 1)
    print(
        f"emulated_ranks={PIPELINE * max(Ds)} measured_over_simulated={statistics.median(ratios):.3f} "
        f"worst_case_error={worst:.3f} bf_over_df_small_batch={bf_df:.3f} vs_torch_loopedbfs={vs_torch:.3f}"
    )


def _ranking(rows: list[dict[str, Any]]) -> tuple[int, int]:
    """Pairs of schedules of one (L, M, D) whose simulated step times differ by more than 5%, and how many of them
    the measurement orders the same way."""
    agree = pairs = 0
    for a, b in itertools.combinations(rows, 2):
        if (a["L"], a["M"], a["D"]) != (b["L"], b["M"], b["D"]):
            continue
        if abs(a["simulated"] - b["simulated"]) <= 0.05 * min(a["simulated"], b["simulated"]):
            continue
        pairs += 1
        agree += (a["simulated"] < b["simulated"]) == (a["measured"] < b["measured"])
    return agree, pairs


if __name__ == "__main__":
    main()
