"""The paper's comparison on 16 emulated GPUs: the real strategy and executor, GPU time scale, a stated network.

The emulated model is the planner's 52B GPT (64 layers, hidden 8192, sequence 1024) on 2 nodes of 8 A100-class GPUs
(``python -m lightning_bfpp.plan``'s default cluster: 312 TFLOP/s at 50%, the assumed GPU efficiency curve, 200 GB/s
inside a node, 25 GB/s across, 10 us latency). Every rank trains ``BFPPStrategy`` under the Lightning Trainer with
P = 8 pipeline ranks and D = 2 replicas (``rank_layout="dp_contiguous"``, micro-batches of one sequence), 16
processes in all. What stands in for the GPUs (``emulated_network.py``):

- each layer's forward and backward sleep the planner's time for them (``--time-scale`` times longer, so that the
  host work per action is a small share of each kernel: measured and printed as ``host_share``);
- the pipeline link runs transfers in NCCL's order (one stream per rank, rendezvous sends) and makes each last the
  stated network's ``latency + 16 MiB / bandwidth``; the data-parallel all-reduces end no earlier than a ring
  all-reduce of the stage's float32 gradients would, one after another on the rank's communication stream.
  The kernels' scale is the only change to the planner's figures: sizes and bandwidths are the planner's.

At 0.5, 1 and 2 sequences per GPU (M = 4, 8, 16 micro-batches per replica), each schedule runs at its best layout as
the planner predicts it (breadth-first with L > 1 stages per rank; depth-first: 1F1B at M < P, interleaved where M
is a multiple of P; GPipe), with per-micro-batch and with batched weight gradients, each case a launch of its own
(fresh processes, as a job). Each case is compared with
:func:`lightning_bfpp.plan.simulate.simulate` of the same schedule and costs, which also charges the host time per
action and per step measured on this machine (the least-squares line of every rank's CPU time per step against its
number of actions) and the gloo latency under the emulated transfers. A step is timed from the start of its batch to
its end (optimizer step included) on every rank, the longest rank counting, after one warm-up step.

    python benchmarks/emulated_cluster.py            # 3 batch sizes x 3 schedules x 2 weight-gradient modes: ~32 min
    python benchmarks/emulated_cluster.py --quick    # 0.5 sequence per GPU only: about 10 minutes

The last line is ``emulated_ranks=16 host_share=<largest over cases of the ranks' mean CPU time over kernel time>
measured_over_simulated=<median> worst_case_error=<max |measured / simulated - 1|>
bf_over_best_other_small_batch=<step of the fastest other schedule / step of the fastest breadth-first, measured at
0.5 sequence per GPU> predicted=<the same ratio from the planner's cost model>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from bench_launch import bounded_run, free_port  # bounded; at the bound it kills every process the launch started

from lightning_bfpp.plan.cost_model import CostModel
from lightning_bfpp.plan.schedule import GROUP_END, Schedule
from lightning_bfpp.plan.search import predict
from lightning_bfpp.plan.simulate import simulate
from lightning_bfpp.plan.specs import GRAD_BYTES, ClusterSpec, Layout, ModelSpec, cost_model

PIPELINE, REPLICAS, GPUS_PER_NODE, WARMUP = 8, 2, 8, 1
SIZES = (0.5, 1.0, 2.0)  # sequences per GPU
SCHEDULES = ("breadth_first", "depth_first", "gpipe")
WEIGHT_GRADIENTS = ("per_micro_batch", "batched")
MODEL = ModelSpec.from_params(52e9)
CLUSTER = ClusterSpec(nodes=PIPELINE * REPLICAS // GPUS_PER_NODE, gpus_per_node=GPUS_PER_NODE)


# ------------------------------------------------------------------------------------------------ the plan
def micro_batches(size: float) -> int:
    return round(size * PIPELINE)  # size x P x D sequences over D replicas, one sequence per micro-batch


def layout(schedule: str, stages_per_rank: int, num_micro_batches: int, weight_gradients: str) -> Layout:
    return Layout(
        schedule, PIPELINE, stages_per_rank, REPLICAS, 1, num_micro_batches, weight_gradients=weight_gradients
    )


def best_layout(schedule: str, num_micro_batches: int, weight_gradients: str) -> Layout:
    """The planner's fastest layout of ``schedule``: breadth-first with L > 1, depth-first with L = 1 (1F1B) or any L
    where M is a multiple of P, GPipe with L = 1."""
    if schedule == "breadth_first":
        options = [L for L in (2, 4, 8)]
    elif schedule == "depth_first":
        options = [1] + ([2, 4, 8] if num_micro_batches % PIPELINE == 0 else [])
    else:
        options = [1]
    candidates = [layout(schedule, L, num_micro_batches, weight_gradients) for L in options]
    return min(candidates, key=lambda c: predict(MODEL, CLUSTER, c).step_time)


def executed_schedule(lay: Layout) -> Schedule:
    """The schedule the strategy runs for ``lay`` (``StagePipeline``'s own)."""
    from lightning_bfpp.options import PipelineOptions
    from lightning_bfpp.run.pipeline import step_schedule

    options = PipelineOptions.build(
        None,
        pipeline_parallel_size=PIPELINE,
        stages_per_rank=lay.stages_per_rank,
        micro_batches=lay.num_micro_batches,
        schedule=lay.schedule if (lay.schedule, lay.stages_per_rank) != ("depth_first", 1) else "1f1b",
        weight_gradients=lay.weight_gradients,
    )
    return step_schedule(options, PIPELINE, lay.num_micro_batches)


def emulated_cost(lay: Layout, scale: float, host_time: float = 0.0, extra_latency: float = 0.0) -> CostModel:
    """The planner's cost model of ``lay`` on the emulated clock (times ``scale``), with ``host_time`` per action and
    ``extra_latency`` (the real gloo latency under each emulated transfer)."""
    cost = cost_model(MODEL, CLUSTER, lay)
    return replace(
        cost,
        forward_time=[scale * f for f in cost.forward_time],  # type: ignore[union-attr]
        p2p_latency=scale * cost.p2p_latency + extra_latency,
        p2p_bandwidth=[b / scale for b in cost.p2p_bandwidth],  # type: ignore[union-attr]
        dp_latency=scale * cost.dp_latency,
        dp_bandwidth=cost.dp_bandwidth / scale,
        host_time=host_time,
        host_blocking=True,  # the sleeping kernels hold the host, as CPU kernels do
    )


def actions_per_rank(schedule: Schedule) -> list[int]:
    return [sum(a != GROUP_END for a in actions) for actions in schedule.actions]


# ------------------------------------------------------------------------------------------------ inside a rank
def emulated_layers(scale: float) -> list[nn.Module]:
    """The 64 layers, the embedding's parameters with the first and the logits' (time and parameters) with the last."""
    from emulated_network import LINEAR_WIDTH, EmulatedLayer

    cost = cost_model(MODEL, CLUSTER, layout("gpipe", 1, 1, "batched"))
    per_stage = MODEL.layers // PIPELINE
    layer_s = cost.forward_time[0] / per_stage  # type: ignore[index]
    head_s = cost.forward_time[-1] - cost.forward_time[0]  # type: ignore[index]
    params_per_element = MODEL.layer_params / LINEAR_WIDTH**2
    layers = []
    for i in range(MODEL.layers):
        forward = layer_s + (head_s if i == MODEL.layers - 1 else 0.0)
        extra = MODEL.embedding_params if i == 0 else MODEL.vocab * MODEL.hidden if i == MODEL.layers - 1 else 0

        def batched(n: int, weight: float = forward) -> float:
            return scale * cost.batched_weight_grad_time(weight, n)

        layers.append(
            EmulatedLayer(
                scale * forward, 2 * scale * forward, scale * forward, batched, round(extra / params_per_element)
            )
        )
    return layers


def gloo_latency() -> float:
    """Median one-way time of a small gloo message between ranks 0 and 1 (ping-pong)."""
    rank, buf, trips = dist.get_rank(), torch.zeros(1), []
    dist.barrier()
    for _ in range(50 if rank < 2 else 0):
        start = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        else:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        trips.append((time.perf_counter() - start) / 2)
    return statistics.median(trips) if trips else 0.0


def run_case(case: dict[str, Any], scale: float, steps: int) -> dict[str, Any]:
    """One fit; per rank: the timed steps' wall times, CPU time and emulated kernel time per step."""
    import lightning.pytorch as pl
    from emulated_network import SLEPT, EmulatedLink

    from lightning_bfpp import BFPPStrategy, PipelineModule

    class Model(PipelineModule):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(emulated_layers(scale))

        def pipeline_layers(self) -> nn.ModuleList:
            return self.layers

        def pipeline_input(self, batch: Any) -> Tensor:
            return batch

        def pipeline_loss(self, outputs: Tensor, batch: Any) -> Tensor:
            return outputs.mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class Clock(pl.Callback):
        """Wall, CPU and emulated kernel time of each batch, from its start to its end (optimizer step included)."""

        def __init__(self) -> None:
            self.spans: list[tuple[float, float, float]] = []
            self._start = (0.0, 0.0, 0.0)

        def _now(self) -> tuple[float, float, float]:
            return time.perf_counter(), time.process_time(), SLEPT["kernels"]

        def on_train_batch_start(self, *args: Any) -> None:
            self._start = self._now()

        def on_train_batch_end(self, *args: Any) -> None:
            self.spans.append(tuple(b - a for a, b in zip(self._start, self._now(), strict=True)))  # type: ignore[arg-type]

    strategy = BFPPStrategy(
        pipeline_parallel_size=PIPELINE,
        stages_per_rank=case["L"],
        micro_batches=case["M"],
        schedule=case["schedule"] if (case["schedule"], case["L"]) != ("depth_first", 1) else "1f1b",
        weight_gradients=case["weight_gradients"],
        rank_layout="dp_contiguous",
        timeout=timedelta(seconds=600),
        link_class=EmulatedLink,
        timeline_dir=case.get("timeline"),
        timeline_batches=(WARMUP + steps, WARMUP + steps + 1),  # one more batch, after the timed ones
    )
    clock, batches = Clock(), WARMUP + steps + ("timeline" in case)
    from emulated_network import LINEAR_WIDTH

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=PIPELINE * REPLICAS,
        strategy=strategy,
        max_steps=batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        use_distributed_sampler=False,
    )
    data = [torch.randn(case["M"], LINEAR_WIDTH) for _ in range(batches)]
    trainer.fit(Model(), train_dataloaders=DataLoader(data, batch_size=None))
    deltas = list(zip(*clock.spans[WARMUP : WARMUP + steps], strict=True))
    mine = {"times": list(deltas[0]), "cpu": statistics.median(deltas[1]), "kernels": statistics.median(deltas[2])}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {
        **case,
        "times": [max(g["times"][i] for g in gathered) for i in range(len(mine["times"]))],
        "cpu": [g["cpu"] for g in gathered],
        "kernels": [g["kernels"] for g in gathered],
    }


def rank_main(cases: list[dict[str, Any]], cfg: dict[str, Any]) -> None:
    """Runs ``cases`` in one launch of 16 processes; rank 0 prints one RESULT line per case."""
    from emulated_network import Network, install

    from lightning_bfpp.plan.specs import ACTIVATION_BYTES

    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    scale = cfg["time_scale"]
    cost = cost_model(MODEL, CLUSTER, layout("gpipe", 1, 1, "batched"))
    from emulated_network import LINEAR_WIDTH

    install(
        Network(
            time_scale=scale,
            p2p_latency=CLUSTER.latency_us * 1e-6,
            boundary_bytes=ACTIVATION_BYTES * MODEL.seq_len * MODEL.hidden,
            intra_node_bandwidth=CLUSTER.intra_node_gbps * 1e9,
            inter_node_bandwidth=CLUSTER.inter_node_gbps * 1e9,
            gpus_per_node=GPUS_PER_NODE,
            dp_size=REPLICAS,
            dp_latency=cost.dp_latency,
            dp_bandwidth=cost.dp_bandwidth,
            grad_bytes_per_element=GRAD_BYTES * MODEL.layer_params / LINEAR_WIDTH**2,
        )
    )
    latency = gloo_latency()
    if dist.get_rank() == 0:
        print("LINKS " + json.dumps({"gloo_latency": latency}), flush=True)
    profile = cfg.get("profile") if dist.get_rank() == 0 else None
    for k, case in enumerate(cases):
        if profile and k == 0:
            import cProfile

            profiler = cProfile.Profile(time.process_time)
            result = profiler.runcall(run_case, case, scale, cfg["steps"])
            profiler.dump_stats(profile)
        else:
            result = run_case(case, scale, cfg["steps"])
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ orchestration
def launch(cases: list[dict[str, Any]], cfg: dict[str, Any], timeout: float) -> tuple[dict, list[dict]]:
    world = PIPELINE * REPLICAS
    spec = json.dumps({"cases": cases, "cfg": cfg})
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", f"--master-port={free_port()}"]
    code, output = bounded_run([*cmd, __file__, "--rank-spec", spec], timeout)
    lines = output.splitlines()

    def parsed(prefix: str) -> list[dict]:
        return [json.loads(line[len(prefix) :]) for line in lines if line.startswith(prefix)]

    links, results = parsed("LINKS "), parsed("RESULT ")
    if code != 0 or not links or len(results) != len(cases):
        log = Path(tempfile.mkdtemp(prefix="emulated_cluster_")) / "ranks.log"
        log.write_text(output)
        tail = output[-8000:]
        raise RuntimeError(f"launch of {world} ranks failed ({code}); every rank's output is in {log}:\n{tail}")
    return links[0], results


def host_times(results: list[dict[str, Any]]) -> tuple[float, float]:
    """Host time per step and per action: the least-squares line of every rank's CPU time per step against its
    actions per step, over every case (CPU time, so the waits and the sleeping kernels do not count)."""
    points = []
    for result in results:
        actions = actions_per_rank(executed_schedule(as_layout(result)))
        points += [(actions[r // REPLICAS], cpu) for r, cpu in enumerate(result["cpu"])]  # dp_contiguous: pp * D + dp
    slope, intercept = statistics.linear_regression(*zip(*points, strict=True))
    return max(intercept, 0.0), max(slope, 0.0)


def as_layout(case: dict[str, Any]) -> Layout:
    return layout(case["schedule"], case["L"], case["M"], case["weight_gradients"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="0.5 sequence per GPU only")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per case, after one warm-up step (2)")
    parser.add_argument("--time-scale", type=float, default=4.0, help="emulated seconds per GPU second (4)")
    parser.add_argument("--output", default=None, help="write every case's figures to this JSON file")
    parser.add_argument(
        "--timeline",
        default=None,
        help="write the executed and simulated timelines of breadth-first "
        "with batched weight gradients at 0.5 sequence per GPU here",
    )
    parser.add_argument("--profile", default=None, help="write a cProfile of rank 0's first measured fit here")
    parser.add_argument("--rank-spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.rank_spec is not None:
        spec = json.loads(args.rank_spec)
        rank_main(spec["cases"], spec["cfg"])
        return
    cfg = {"steps": args.steps, "time_scale": args.time_scale, "profile": args.profile}
    sizes = SIZES[:1] if args.quick else SIZES
    cases = []
    for size in sizes:
        for name in SCHEDULES:
            for weights in WEIGHT_GRADIENTS:
                best = best_layout(name, micro_batches(size), weights)
                cases.append(
                    {
                        "size": size,
                        "schedule": name,
                        "weight_gradients": weights,
                        "L": best.stages_per_rank,
                        "M": best.num_micro_batches,
                    }
                )
                if args.timeline and size == SIZES[0] and name == "breadth_first" and weights == "batched":
                    cases[-1]["timeline"] = str(Path(args.timeline).resolve())
    planned = sum(predict(MODEL, CLUSTER, as_layout(c)).step_time for c in cases) * args.time_scale
    print(
        f"{len(cases)} cases, {cfg['steps']} timed steps each after {WARMUP} warm-up; about "
        f"{planned * (cfg['steps'] + WARMUP) / 60:.1f} minutes of steps plus a fit's start-up per case",
        flush=True,
    )
    start = time.perf_counter()
    results, latencies = [], []
    for k, case in enumerate(cases):  # each case a job of its own: nothing of one fit weighs on the next
        links, (result,) = launch([case], {**cfg, "profile": cfg["profile"] if k == 0 else None}, timeout=900)
        results.append(result)
        latencies.append(links["gloo_latency"])
    links = {"gloo_latency": statistics.median(latencies)}
    per_step, host = host_times(results)
    print(
        f"16 ranks, {len(cases)} cases in {time.perf_counter() - start:.0f} s; gloo latency "
        f"{links['gloo_latency'] * 1e6:.0f} us; host time {host * 1e6:.0f} us per action and {per_step * 1e3:.1f} ms "
        f"per step (every rank's CPU time per step against its actions, least squares); time scale {args.time_scale:g}",
        flush=True,
    )
    print(
        f"\n{'seq/GPU':>7s} {'schedule':14s} {'weight grads':16s} {'L':>2s} {'M':>3s} {'measured ms':>12s} "
        f"{'simulated ms':>13s} {'ratio':>6s} {'planner ms':>11s} {'CPU ms/step':>12s} {'host share':>11s}"
    )
    for r in results:
        lay = as_layout(r)
        schedule = executed_schedule(lay)
        r["measured"] = statistics.median(r["times"])
        cost = emulated_cost(lay, args.time_scale, host, links["gloo_latency"])
        r["simulated"] = simulate(schedule, cost, record_events=False).step_time + per_step
        if "timeline" in r:
            from lightning_bfpp.plan.simulate import plot_timeline

            title = f"simulated {r['schedule']} batched: P={PIPELINE} L={r['L']} M={r['M']} (one replica)"
            plot_timeline(simulate(schedule, cost).events, Path(r["timeline"]) / "simulated.png", title)
        r["planner"] = args.time_scale * predict(MODEL, CLUSTER, lay).step_time
        r["host_share"] = statistics.mean(c / k for c, k in zip(r["cpu"], r["kernels"], strict=True) if k > 0)
        print(
            f"{r['size']:7.1f} {r['schedule']:14s} {r['weight_gradients']:16s} {r['L']:2d} {r['M']:3d} "
            f"{r['measured'] * 1e3:12.1f} {r['simulated'] * 1e3:13.1f} {r['measured'] / r['simulated']:6.3f} "
            f"{r['planner'] * 1e3:11.1f} {statistics.mean(r['cpu']) * 1e3:12.1f} {r['host_share']:11.3f}"
        )
    if args.output:
        record = {"time_scale": args.time_scale, "host_per_action": host, "host_per_step": per_step, **links}
        Path(args.output).write_text(json.dumps({**record, "cases": results}, indent=1))
    ratios = [r["measured"] / r["simulated"] for r in results]
    small = [r for r in results if r["size"] == SIZES[0]]

    def advantage(key: str) -> float:
        bf = min(r[key] for r in small if r["schedule"] == "breadth_first")
        return min(r[key] for r in small if r["schedule"] != "breadth_first") / bf

    print(
        f"emulated_ranks={PIPELINE * REPLICAS} host_share={max(r['host_share'] for r in results):.3f} "
        f"measured_over_simulated={statistics.median(ratios):.3f} worst_case_error="
        f"{max(abs(x - 1) for x in ratios):.3f} bf_over_best_other_small_batch={advantage('measured'):.3f} "
        f"predicted={advantage('planner'):.3f}"
    )


if __name__ == "__main__":
    main()
