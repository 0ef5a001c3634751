"""What limits pipeline speed on this CPU: small micro-batches, and two processes side by side.

1. One process, one thread: forward + backward of 4 MLP blocks (hidden 512, 4x expansion; the half of the
   pipeline_speedup.py model that one of two pipeline ranks holds) on a batch of 256, as one batch or as M
   micro-batches with gradients accumulated; the ratio is the slowdown per sample from micro-batching.
2. The same 256-row matrix multiply loop in one process alone, and in two processes at once; the ratio of
   throughputs is how far two independent processes scale.

    python benchmarks/cpu_scaling.py [--repeats 5] [--micro-batches 8]

Each ratio is the median of ratios of back-to-back runs. The last line is
``micro_batch_slowdown=<x> two_process_scaling=<y>``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN, BATCH = 512, 256


class MLPBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(HIDDEN, 4 * HIDDEN), nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


def train_pass(blocks: nn.Module, x: torch.Tensor, micro_batches: int) -> float:
    """Seconds for forward + backward of ``x`` split into ``micro_batches`` parts, gradients accumulated."""
    for p in blocks.parameters():
        p.grad = None
    start = time.perf_counter()
    for part in x.chunk(micro_batches):
        blocks(part).square().mean().backward()
    return time.perf_counter() - start


def matmul_loop(iterations: int = 200) -> float:
    torch.set_num_threads(1)
    a, w = torch.randn(BATCH, HIDDEN), torch.randn(HIDDEN, 4 * HIDDEN)
    start = time.perf_counter()
    for _ in range(iterations):
        a @ w
    return time.perf_counter() - start


def _timed(queue: mp.Queue) -> None:
    queue.put(matmul_loop())


def two_processes() -> float:
    """Mean seconds of the matmul loop when two processes run it at the same time."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_timed, args=(queue,)) for _ in range(2)]
    for p in procs:
        p.start()
    times = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return statistics.mean(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--micro-batches", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    blocks, x = nn.Sequential(*[MLPBlock() for _ in range(4)]), torch.randn(BATCH, HIDDEN)
    train_pass(blocks, x, 1)  # warm-up
    slowdowns = []
    for _ in range(args.repeats):
        whole, split = train_pass(blocks, x, 1), train_pass(blocks, x, args.micro_batches)
        slowdowns.append(split / whole)
        print(f"batch {BATCH}: {whole * 1e3:7.1f} ms   {args.micro_batches} micro-batches: {split * 1e3:7.1f} ms")
    scalings = []
    for _ in range(args.repeats):
        alone, together = matmul_loop(), two_processes()
        scalings.append(2 * alone / together)
        print(f"matmul loop alone: {alone:.3f} s   two processes at once: {together:.3f} s each")
    slowdown, scaling = statistics.median(slowdowns), statistics.median(scalings)
    print(f"micro_batch_slowdown={slowdown:.3f} two_process_scaling={scaling:.3f}")


if __name__ == "__main__":
    main()
