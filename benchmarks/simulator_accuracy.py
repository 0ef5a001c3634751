"""How close the simulator's predicted step time comes to the measured one, on the pipeline_speedup.py workload.

For each number of micro-batches ``M``:

1. **Profile on one device**: the same 4 stages (8 MLP blocks, hidden 512) trained by bfpp on one process
   (``P = 1, L = 4``, ``M`` micro-batches), with the executed timeline recorded; each stage's forward and backward
   time per micro-batch is the mean of its actions, and the time per step outside the schedule (optimizer step,
   Lightning) is the step time minus the actions' time.
2. **Point-to-point cost**: a gloo ping-pong between two processes of one stage boundary (``256 / M`` x 512 floats).
3. **Prediction**: :func:`~lightning_bfpp.plan.simulate.simulate` of breadth-first ``P = 2, L = 2``, those costs, plus
   the time outside the schedule.
4. **Measurement**: the same model trained by bfpp on two processes (``P = 2, L = 2``), median step time, with its
   executed timeline. A second prediction takes each stage's forward and backward time from that timeline (the
   actions' time minus their waits): it checks the simulation of the schedule (bubble, transfers, order) alone,
   apart from how compute time changes between one process and two.

    python benchmarks/simulator_accuracy.py [--micro-batches 8 2] [--steps 8]

Ratios are predicted / measured step time. The last line is
``predicted_over_measured=<one-device profile, per M> schedule_only=<per M>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_speedup import BATCH, HIDDEN, launch

from lightning_bfpp.plan.schedule import build_schedule
from lightning_bfpp.plan.simulate import CostModel, simulate

PIPELINE, STAGES_PER_RANK, STAGES = 2, 2, 4


def stage_times(trace: Path, rank: int | None = None) -> tuple[list[float], list[float], float]:
    """Mean forward and backward seconds per micro-batch of each stage, and the actions' seconds per recorded step
    on the busiest rank, from an executed timeline (waits inside an action are subtracted)."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    if rank is not None:
        events = [e for e in events if e["tid"] == rank]
    durations: dict[tuple[str, int], list[float]] = defaultdict(list)
    per_rank_busy: dict[int, float] = defaultdict(float)
    waits = [e for e in events if e["cat"] == "wait"]  # each nested in the action that waited

    def waited(action: dict) -> float:
        end = action["ts"] + action["dur"]
        return sum(w["dur"] for w in waits if w["tid"] == action["tid"] and action["ts"] <= w["ts"] <= end)

    for e in events:
        name = e["name"]
        if e["cat"] in ("forward", "backward", "backward_weight") and name[0] in "FBW":
            compute = e["dur"] - waited(e)
            per_rank_busy[e["tid"]] += compute
            if name[0] == "W":  # batched weight gradients of a stage: counted in its backwards
                durations[("W", int(name[1:]))].append(compute)
                continue
            stage = int(name[1:].split(".")[0])
            durations[(name[0], stage)].append(compute)
    forward = [statistics.mean(durations[("F", s)]) * 1e-6 for s in range(STAGES)]
    backward = []
    for s in range(STAGES):
        count = len(durations[("B", s)])
        extra = sum(durations.get(("W", s), [])) / count if count else 0.0
        backward.append((statistics.mean(durations[("B", s)]) + extra) * 1e-6)
    return forward, backward, max(per_rank_busy.values()) * 1e-6


def _ping_pong(rank: int, port: int, numel: int, rounds: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    buf = torch.zeros(numel)
    for small in (True, False):
        tensor = buf[:1] if small else buf
        dist.barrier()
        start = time.perf_counter()
        for _ in range(rounds):
            if rank == 0:
                dist.send(tensor, 1)
                dist.recv(tensor, 1)
            else:
                dist.recv(tensor, 0)
                dist.send(tensor, 0)
        if rank == 0:
            out["small" if small else "large"] = (time.perf_counter() - start) / (2 * rounds)
    dist.destroy_process_group()


def p2p_cost(numel: int, rounds: int = 200) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) of one gloo transfer, from ping-pongs of 1 and ``numel`` floats."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ping_pong, args=(29541, numel, rounds, out), nprocs=2)
        small, large = out["small"], out["large"]
    return small, (numel - 1) * 4 / max(large - small, 1e-9)


def predict(micro_batches: int, forward: list[float], backward: list[float], p2p: tuple[float, float, float]) -> float:
    """Simulated step seconds of breadth-first ``P = 2, L = 2``; ``p2p`` = (boundary bytes, latency, bandwidth)."""
    boundary, latency, bandwidth = p2p
    cost = CostModel(
        forward_time=forward,
        backward_time=backward,
        boundary_bytes=boundary,
        p2p_latency=latency,
        p2p_bandwidth=bandwidth,
    )
    schedule = build_schedule("breadth_first", PIPELINE, STAGES_PER_RANK, micro_batches)
    return simulate(schedule, cost, record_events=False).step_time


def run(role: str, micro_batches: int, steps: int, timeline: Path) -> float:
    os.environ["BFPP_BENCH_MICRO_BATCHES"] = str(micro_batches)
    os.environ["BFPP_BENCH_TIMELINE"] = str(timeline)
    try:
        return launch(role, steps)
    finally:
        del os.environ["BFPP_BENCH_TIMELINE"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[8, 2])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    profile_ratios, schedule_ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.micro_batches:
            rows = BATCH // m
            one_dir, two_dir = Path(tmp, f"one{m}"), Path(tmp, f"two{m}")
            one_step = run("bfpp_one_device", m, args.steps, one_dir)
            forward, backward, busy = stage_times(one_dir / "timeline.json")
            outside = one_step - busy / 2  # the timeline holds 2 steps
            latency, bandwidth = p2p_cost(rows * HIDDEN)
            measured = run("bfpp", m, args.steps, two_dir)
            p2p = (rows * HIDDEN * 4, latency, bandwidth)
            from_profile = predict(m, forward, backward, p2p) + outside
            forward2, backward2, _ = stage_times(two_dir / "timeline.json")
            from_run = predict(m, forward2, backward2, p2p) + outside
            profile_ratios.append(from_profile / measured)
            schedule_ratios.append(from_run / measured)
            print(f"M={m}: micro-batches of {rows} rows")
            print(f"  one-device profile, ms per micro-batch: forward {[round(f * 1e3, 2) for f in forward]}")
            print(f"    backward {[round(b * 1e3, 2) for b in backward]}; outside the schedule {outside * 1e3:.1f}")
            print(f"  two-process run, ms per micro-batch: forward {[round(f * 1e3, 2) for f in forward2]}")
            print(f"    backward {[round(b * 1e3, 2) for b in backward2]}")
            print(f"  gloo transfer: latency {latency * 1e6:.0f} us, bandwidth {bandwidth / 1e9:.2f} GB/s")
            print(
                f"  step: measured {measured * 1e3:.1f} ms; predicted from the one-device profile "
                f"{from_profile * 1e3:.1f} ms ({from_profile / measured:.3f}), from the run's own compute times "
                f"{from_run * 1e3:.1f} ms ({from_run / measured:.3f})",
                flush=True,
            )
    ms = " ".join(f"M{m}:{r:.3f}" for m, r in zip(args.micro_batches, profile_ratios, strict=True))
    ss = " ".join(f"M{m}:{r:.3f}" for m, r in zip(args.micro_batches, schedule_ratios, strict=True))
    print(f"predicted_over_measured={ms} schedule_only={ss}")


if __name__ == "__main__":
    main()
