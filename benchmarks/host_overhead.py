"""Host time per action: bfpp and torch's ScheduleLoopedBFS against the compute floor of the same actions.

Tiny layers make each forward or backward of one stage and micro-batch shorter than the Python around it, as on a
GPU: what is left is the cost of the executor, the transfers and Lightning's step. Workload: 8 layers
``Linear(8, 32) - GELU - Linear(32, 8)``, batch 32, M = 32 micro-batches (one row each), SGD, one thread per process.

- ``single``: one process runs the 32 micro-batches one after another through the 8 layers (plain torch, gradients
  accumulated, one optimizer step): the compute floor. ``compute_us_per_action`` is its step over 2 x 8 x 32 layer
  forwards and backwards.
- ``bfpp``: ``BFPPStrategy`` with P = 2, L = 4 (one layer per stage), breadth-first, under the Lightning Trainer;
  the step is the time between the starts of consecutive batches (everything Lightning does per step counts).
- ``torch_loopedbfs``: ``torch.distributed.pipelining.ScheduleLoopedBFS`` on the same stages, a plain loop.

A pipelined step is divided by the 2 x L x M = 256 compute actions of one rank. Launches alternate; each figure is the
median over the launches (min-max printed).

    python benchmarks/host_overhead.py [--repeats 5] [--steps 60]
    python benchmarks/host_overhead.py --compare /path/to/earlier/tree     # bfpp of both trees, alternating
    python benchmarks/host_overhead.py --role bfpp --steps 60 --profile out.prof    # cProfile of each rank

The last line is ``bfpp_us_per_action=<x> torch_us_per_action=<y> compute_us_per_action=<z>``.
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

WIDTH, HIDDEN, LAYERS, BATCH, MICRO, PIPELINE, STAGES_PER_RANK = 8, 32, 8, 32, 32, 2, 4
WARMUP = 10
ROLES = ("single", "bfpp", "torch_loopedbfs")


def make_layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, WIDTH)) for _ in range(LAYERS)]


def make_data(steps: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g)) for _ in range(steps)]


def now() -> tuple[float, float]:
    """Wall-clock and CPU time (all threads of this process) in seconds."""
    return time.perf_counter(), time.process_time()


def step_times(starts: list[tuple[float, float]]) -> dict[str, list[float]]:
    """Wall-clock and CPU times between consecutive step starts, after the warm-up."""
    pairs = list(zip(starts[WARMUP:], starts[WARMUP + 1 :], strict=False))
    return {"wall": [b[0] - a[0] for a, b in pairs], "cpu": [b[1] - a[1] for a, b in pairs]}


def run_single(steps: int) -> dict[str, list[float]]:
    model = nn.Sequential(*make_layers())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    starts: list[tuple[float, float]] = []
    for x, y in make_data(steps + 1):
        starts.append(now())
        optimizer.zero_grad()
        for xm, ym in zip(x.chunk(MICRO), y.chunk(MICRO), strict=True):
            (F.mse_loss(model(xm), ym) / MICRO).backward()
        optimizer.step()
    return step_times(starts)


def run_bfpp(steps: int, profile: str | None) -> dict[str, list[float]] | None:
    import lightning.pytorch as pl

    from lightning_bfpp import BFPPStrategy, PipelineModule

    class Model(PipelineModule):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(make_layers())

        def pipeline_layers(self) -> nn.ModuleList:
            return self.layers

        def pipeline_input(self, batch: Any) -> Tensor:
            return batch[0]

        def pipeline_loss(self, outputs: Tensor, batch: Any) -> Tensor:
            return F.mse_loss(outputs, batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class StepStarts(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[tuple[float, float]] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self.starts.append(now())
            if profile is not None and len(self.starts) == WARMUP + 1:
                profiler.enable()

    import cProfile

    profiler = cProfile.Profile()
    strategy = BFPPStrategy(
        pipeline_parallel_size=PIPELINE,
        stages_per_rank=STAGES_PER_RANK,
        micro_batches=MICRO,
        timeout=timedelta(seconds=300),
    )
    timer = StepStarts()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=PIPELINE,
        strategy=strategy,
        max_steps=steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        use_distributed_sampler=False,
    )
    trainer.fit(Model(), train_dataloaders=DataLoader(make_data(steps + 1), batch_size=None))
    if profile is not None:
        profiler.disable()
        profiler.dump_stats(f"{profile}.rank{trainer.global_rank}")
    return step_times(timer.starts) if trainer.global_rank == 0 else None


def run_torch(steps: int) -> dict[str, list[float]] | None:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleLoopedBFS

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    world = dist.get_world_size()
    layers = make_layers()
    num_stages = world * STAGES_PER_RANK
    stages, params = [], []
    for s in range(rank, num_stages, world):
        module = layers[s]
        params += list(module.parameters())
        stages.append(PipelineStage(module, s, num_stages, torch.device("cpu")))
    schedule = ScheduleLoopedBFS(stages, n_microbatches=MICRO, loss_fn=F.mse_loss)
    optimizer = torch.optim.SGD(params, lr=1e-3)
    starts: list[tuple[float, float]] = []
    for x, y in make_data(steps + 1):
        starts.append(now())
        optimizer.zero_grad()
        if rank == 0:
            schedule.step(x, target=y)
        elif rank == world - 1:
            schedule.step(target=y)
        else:
            schedule.step()
        optimizer.step()
    dist.destroy_process_group()
    return step_times(starts) if rank == 0 else None


def launch(role: str, steps: int, path: str | None = None) -> dict[str, float]:
    """Runs one configuration in fresh processes (``path``: import lightning_bfpp from there); returns the median
    wall-clock and CPU step times of rank 0 in seconds."""
    env = {} if path is None else {"PYTHONPATH": os.pathsep.join([path, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--role", role, "--steps", str(steps)]
    if role == "torch_loopedbfs":
        cmd[1:2] = ["-m", "torch.distributed.run", f"--nproc-per-node={PIPELINE}", "--master-port=29541", __file__]
    code, output = bounded_run(cmd, 900, **env)
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if code != 0 or not lines:
        raise RuntimeError(f"{role} failed ({code}):\n{output[-6000:]}")
    return {key: statistics.median(values) for key, values in json.loads(lines[-1][7:]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=ROLES, default=None)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per launch (after 10 warm-up steps)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating launches per configuration")
    parser.add_argument(
        "--profile", default=None, help="with --role bfpp: write each rank's cProfile stats to PROFILE.rank<r>"
    )
    parser.add_argument(
        "--compare", default=None, help="also run bfpp from this source tree (e.g. a worktree of an earlier commit)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.role is not None:
        total = args.steps + WARMUP
        if args.role == "single":
            times: dict[str, list[float]] | None = run_single(total)
        elif args.role == "bfpp":
            times = run_bfpp(total, args.profile)
        else:
            times = run_torch(total)
        if times is not None:
            print("RESULT " + json.dumps(times), flush=True)
        return
    configs = list(ROLES) + (["bfpp_compared"] if args.compare else [])
    results: dict[str, list[dict[str, float]]] = {config: [] for config in configs}
    for repeat in range(args.repeats):
        for config in configs if repeat % 2 == 0 else configs[::-1]:
            if config == "bfpp_compared":
                results[config].append(launch("bfpp", args.steps, args.compare))
            else:
                results[config].append(launch(config, args.steps))
            r = results[config][-1]
            print(
                f"repeat {repeat} {config:16s} step {r['wall'] * 1e3:8.2f} ms, cpu {r['cpu'] * 1e3:8.2f} ms", flush=True
            )
    per_rank = 2 * STAGES_PER_RANK * MICRO  # compute actions of one pipeline rank
    actions = {config: per_rank for config in configs} | {"single": 2 * LAYERS * MICRO}

    def us(config: str, key: str) -> list[float]:
        return [r[key] / actions[config] * 1e6 for r in results[config]]

    def show(values: list[float]) -> str:
        return f"{statistics.median(values):7.1f} ({min(values):.1f}, {max(values):.1f})"

    print("\nper action (us), median (min, max) over launches; cpu: rank 0's process CPU time")
    print("configuration        wall                    cpu")
    for config in configs:
        print(f"{config:16s} {show(us(config, 'wall')):24s} {show(us(config, 'cpu'))}")
    for key in ("wall", "cpu"):
        extra = [b - c for b, c in zip(us("bfpp", key), us("single", key), strict=True)]
        print(f"bfpp minus compute ({key}), paired launches: {show(extra)}")
        if args.compare:
            gain = [b - c for b, c in zip(us("bfpp_compared", key), us("bfpp", key), strict=True)]
            print(f"compared tree minus this tree ({key}), paired launches: {show(gain)}")
    print(
        f"bfpp_us_per_action={statistics.median(us('bfpp', 'wall')):.1f} "
        f"torch_us_per_action={statistics.median(us('torch_loopedbfs', 'wall')):.1f} "
        f"compute_us_per_action={statistics.median(us('single', 'wall')):.1f}"
    )


if __name__ == "__main__":
    main()
