"""Pipeline speed on CPU: bfpp against one process, against torch.distributed.pipelining, and its one-rank overhead.

Every configuration runs as its own launch; the compared launches alternate and each figure is the median of the
ratios of paired runs (this machine is shared and noisy). Workload: 8 MLP blocks (hidden 512, 4x expansion), batch
256, M=8, L=2 stages per rank, SGD, one thread per process. ``bfpp`` runs with autograd's per-micro-batch weight
gradients, ``bfpp_batched`` with ``weight_gradients="batched"`` (one weight-gradient product per Linear and run of
backwards).

    python benchmarks/pipeline_speedup.py [--repeats 5] [--steps 8]
    python benchmarks/pipeline_speedup.py --compare TREE   # bfpp of this tree against TREE's, alternating


Each ratio is printed as the median of the paired ratios with their min-max. The last line is
``speedup=<bfpp_batched over one process> default_speedup=<bfpp over one process> vs_torch_loopedbfs=<bfpp over
torch LoopedBFS> batched_vs_torch_loopedbfs=<bfpp_batched over torch LoopedBFS> single_rank_overhead=<bfpp_p1 over
one process>`` (step-time ratios except the speedups; ``bfpp_p1``: P = L = M = 1). ``vs_torch_loopedbfs`` compares
like with like (default options, which torch's schedule also has); the batched option has no torch counterpart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from bench_launch import bounded_run  # bounded; at the bound it kills every process the launch started

HIDDEN, BLOCKS, BATCH, STAGES_PER_RANK, WARMUP = 512, 8, 256, 2, 2
MICRO = int(os.environ.get("BFPP_BENCH_MICRO_BATCHES", "8"))  # M; the CLI sets it for the launched processes


class MLPBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(HIDDEN, 4 * HIDDEN), nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(F.gelu(self.up(x)))


def make_blocks() -> list[nn.Module]:
    torch.manual_seed(0)
    return [MLPBlock() for _ in range(BLOCKS)]


def make_data(steps: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, HIDDEN, generator=g), torch.randn(BATCH, HIDDEN, generator=g)) for _ in range(steps)]


# ---------------------------------------------------------------------------------------------------- Lightning runs
def run_lightning(role: str, steps: int) -> None:
    import lightning.pytorch as pl

    from lightning_bfpp import BFPPStrategy, PipelineModule

    class Model(PipelineModule):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(make_blocks())

        def pipeline_layers(self) -> nn.ModuleList:
            return self.blocks

        def pipeline_input(self, batch: Any) -> Tensor:
            return batch[0]

        def pipeline_loss(self, outputs: Tensor, batch: Any) -> Tensor:
            return F.mse_loss(outputs, batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self.times.append(time.perf_counter() - self.start)

    if role == "single":
        strategy: Any = "auto"
        devices = 1
    elif role == "bfpp_one_device":  # the pipelined run's 4 stages on one process (simulator_accuracy.py)
        strategy = BFPPStrategy(
            pipeline_parallel_size=1,
            stages_per_rank=2 * STAGES_PER_RANK,
            micro_batches=MICRO,
            timeline_dir=os.environ.get("BFPP_BENCH_TIMELINE"),
            timeline_batches=(WARMUP, WARMUP + 2),
        )
        devices = 1
    elif role == "bfpp_p1":
        strategy, devices = BFPPStrategy(pipeline_parallel_size=1, stages_per_rank=1, micro_batches=1), 1
    else:
        strategy = BFPPStrategy(
            pipeline_parallel_size=2,
            stages_per_rank=STAGES_PER_RANK,
            micro_batches=MICRO,
            weight_gradients="batched" if role == "bfpp_batched" else "per_micro_batch",
            timeout=timedelta(seconds=float(os.environ.get("BFPP_BENCH_TIMEOUT", "300"))),
            timeline_dir=os.environ.get("BFPP_BENCH_TIMELINE"),
            timeline_batches=(WARMUP, WARMUP + 2),
        )
        devices = 2
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        use_distributed_sampler=False,
    )
    trainer.fit(Model(), train_dataloaders=DataLoader(make_data(steps), batch_size=None))
    if trainer.global_rank == 0:
        print("RESULT " + json.dumps(timer.times[WARMUP:]), flush=True)


# ------------------------------------------------------------------------------------- torch.distributed.pipelining
def run_torch(role: str, steps: int) -> None:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe, ScheduleInterleaved1F1B, ScheduleLoopedBFS

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    world = dist.get_world_size()
    blocks = make_blocks()
    per_rank = 1 if role == "torch_gpipe" else STAGES_PER_RANK
    num_stages = world * per_rank
    size = BLOCKS // num_stages
    stages, params = [], []
    for s in range(rank, num_stages, world):
        module = nn.Sequential(*blocks[s * size : (s + 1) * size])
        params += list(module.parameters())
        stages.append(PipelineStage(module, s, num_stages, torch.device("cpu")))
    schedule_cls = {"torch_loopedbfs": ScheduleLoopedBFS, "torch_interleaved1f1b": ScheduleInterleaved1F1B}.get(role)
    loss_fn = F.mse_loss
    if schedule_cls is None:
        schedule = ScheduleGPipe(stages[0], n_microbatches=MICRO, loss_fn=loss_fn)
    else:
        schedule = schedule_cls(stages, n_microbatches=MICRO, loss_fn=loss_fn)
    optimizer = torch.optim.SGD(params, lr=1e-3)
    times = []
    for x, y in make_data(steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        if rank == 0:
            schedule.step(x, target=y)
        elif rank == world - 1:
            schedule.step(target=y)
        else:
            schedule.step()
        optimizer.step()
        times.append(time.perf_counter() - start)
    if rank == 0:
        print("RESULT " + json.dumps(times[WARMUP:]), flush=True)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ orchestration
COMPARED = "@compared"  # a role name ending in this runs the package of the --compare tree


def launch(role: str, steps: int, compared_tree: str | None = None) -> float:
    """Runs one configuration in fresh processes; returns its median step time in seconds."""
    variables = {}
    if role.endswith(COMPARED):
        assert compared_tree is not None
        role = role.removesuffix(COMPARED)
        variables["PYTHONPATH"] = os.pathsep.join([compared_tree, os.environ.get("PYTHONPATH", "")])
    if role.startswith("torch"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29533"]
        cmd += [__file__, "--role", role, "--steps", str(steps)]
    else:
        cmd = [sys.executable, __file__, "--role", role, "--steps", str(steps)]
    code, output = bounded_run(cmd, 600, **variables)
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if code != 0 or not lines:
        raise RuntimeError(f"{role} failed ({code}):\n{output[-6000:]}")
    return statistics.median(json.loads(lines[-1][7:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", default=None)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="alternating launches per configuration")
    parser.add_argument("--micro-batches", type=int, default=8, help="M for the pipelined runs (default 8)")
    parser.add_argument("--overhead-only", action="store_true", help="only the one-rank overhead, in paired runs")
    parser.add_argument(
        "--compare",
        default=None,
        metavar="TREE",
        help="only bfpp (default and batched) of this tree against the same runs of the package in TREE (a checkout)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.role is not None:
        (run_torch if args.role.startswith("torch") else run_lightning)(args.role, args.steps)
        return
    os.environ["BFPP_BENCH_MICRO_BATCHES"] = str(args.micro_batches)  # read by the launched processes
    roles = ["single", "bfpp", "bfpp_batched", "torch_loopedbfs", "torch_interleaved1f1b", "torch_gpipe", "bfpp_p1"]
    if args.overhead_only:
        roles = ["single", "bfpp_p1"]
    if args.compare:
        roles = ["bfpp", "bfpp" + COMPARED, "bfpp_batched", "bfpp_batched" + COMPARED]
    times: dict[str, list[float]] = {r: [] for r in roles}
    for repeat in range(args.repeats):
        for role in roles if repeat % 2 == 0 else roles[::-1]:  # alternate the order between repeats
            times[role].append(launch(role, args.steps, args.compare))
            print(f"repeat {repeat} {role:24s} step {times[role][-1] * 1e3:8.1f} ms", flush=True)

    def ratios(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(times[a], times[b], strict=True)]

    def paired(a: str, b: str) -> float:
        return statistics.median(ratios(a, b))

    def spread(a: str, b: str) -> str:
        r = ratios(a, b)
        return f"{statistics.median(r):.3f} (min {min(r):.3f}, max {max(r):.3f}, {len(r)} pairs)"

    if args.compare:
        print("\nconfiguration            median step (ms)")
        for role in roles:
            print(f"{role:24s} {statistics.median(times[role]) * 1e3:17.1f}")
        print(f"bfpp, this tree / {args.compare} step time: {spread('bfpp', 'bfpp' + COMPARED)}")
        print(f"bfpp batched, this tree / compared step time: {spread('bfpp_batched', 'bfpp_batched' + COMPARED)}")
        print(
            f"this_over_compared={paired('bfpp', 'bfpp' + COMPARED):.3f}"
            f" batched_this_over_compared={paired('bfpp_batched', 'bfpp_batched' + COMPARED):.3f}"
        )
        return
    print("\nconfiguration            median step (ms)  speedup vs one process: median (min, max)")
    for role in roles:
        print(f"{role:24s} {statistics.median(times[role]) * 1e3:17.1f}  {spread('single', role)}")
    if args.overhead_only:
        print(f"one-rank overhead (bfpp_p1 / single step time): {spread('bfpp_p1', 'single')}")
        print(f"single_rank_overhead={paired('bfpp_p1', 'single'):.3f}")
        return
    print(f"bfpp / torch LoopedBFS step time: {spread('bfpp', 'torch_loopedbfs')}")
    print(f"bfpp batched / torch LoopedBFS step time: {spread('bfpp_batched', 'torch_loopedbfs')}")
    print(f"bfpp batched / bfpp step time: {spread('bfpp_batched', 'bfpp')}")
    print(f"bfpp / torch Interleaved1F1B step time: {spread('bfpp', 'torch_interleaved1f1b')}")
    print(f"bfpp / torch GPipe step time: {spread('bfpp', 'torch_gpipe')}")
    print(f"bfpp_p1 / one process step time: {spread('bfpp_p1', 'single')}")
    print(
        f"speedup={paired('single', 'bfpp_batched'):.3f} default_speedup={paired('single', 'bfpp'):.3f}"
        f" vs_torch_loopedbfs={paired('bfpp', 'torch_loopedbfs'):.3f}"
        f" batched_vs_torch_loopedbfs={paired('bfpp_batched', 'torch_loopedbfs'):.3f}"
        f" single_rank_overhead={paired('bfpp_p1', 'single'):.3f}"
    )


if __name__ == "__main__":
    main()
