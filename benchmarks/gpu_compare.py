"""Breadth-first against 1F1B on N real devices, measured and predicted: ``python benchmarks/gpu_check.py --devices N``.

One process per device (torchrun; NCCL on GPUs, gloo with ``--cpu``), one pipeline over all of them (P = N, D = 1),
M = P / 2 micro-batches (at least 1): the small-batch regime where 1F1B cannot interleave and breadth-first loops
L = 2 stages per rank. The model is a GPT of about 100M parameters (24 layers, width 576; a tiny one with
``--quick``). Each schedule trains a few steps under the Lightning Trainer; its median step (the device synchronized
around it) is compared with :func:`lightning_bfpp.plan.simulate.simulate` of the same schedule, given

- each pipeline layer's forward and backward time on one micro-batch, profiled on this device before the fits (the
  stage times are the sums over the layers of the strategy's partition);
- the point-to-point latency and bandwidth of a ping-pong of one activation between ranks 0 and 1;
- the host time per action: the fit's CPU time per step over the rank's actions (on GPUs the host runs ahead of the
  device, ``host_blocking=False``).

The last line is ``gpu_compare devices=<N> bf_over_1f1b=<1F1B step / breadth-first step, measured>
predicted=<the same, simulated> measured_over_predicted_bf=<x> measured_over_predicted_1f1b=<y>``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

COMPARE = {"vocab_size": 8192, "seq_len": 512, "n_layer": 24, "n_head": 9, "n_embd": 576, "micro_batch": 2}
QUICK = {"vocab_size": 64, "seq_len": 16, "n_layer": 6, "n_head": 2, "n_embd": 32, "micro_batch": 2}
SCHEDULES = (("breadth_first", 2), ("1f1b", 1))


def launch(devices: int, cpu: bool, quick: bool, timeout: float = 1800) -> int:
    """Runs the comparison on ``devices`` processes (printing their output); returns the exit code."""
    from bench_launch import bounded_run, free_port

    if devices < 2:
        print("gpu_compare needs --devices >= 2 (a pipeline of one rank has nothing to compare)", flush=True)
        return 2
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={devices}", f"--master-port={free_port()}"]
    cmd += [__file__, json.dumps({"cpu": cpu, "quick": quick})]
    code, _ = bounded_run(cmd, timeout, echo=True)
    return 1 if code is None else code


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_layers(model: Any, batch: dict[str, Tensor], device: torch.device, dtype: torch.dtype | None) -> Any:
    """Median forward and backward seconds of each pipeline layer on one micro-batch (3 runs after one warm-up)."""
    layers = list(model.pipeline_layers())
    forward: list[list[float]] = [[] for _ in layers]
    backward: list[list[float]] = [[] for _ in layers]
    ids = model.pipeline_input(batch).to(device)
    for repeat in range(4):
        inputs, outputs, h = [], [], ids
        for i, layer in enumerate(layers):
            x = h.detach().requires_grad_(h.is_floating_point())
            _sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = layer(x)
            _sync(device)
            forward[i].append(time.perf_counter() - start)
            inputs.append(x)
            outputs.append(out)
            h = out
        grad = None
        for i in reversed(range(len(layers))):
            _sync(device)
            start = time.perf_counter()
            if grad is None:
                outputs[i].float().square().mean().backward()
            else:
                outputs[i].backward(grad)
            _sync(device)
            backward[i].append(time.perf_counter() - start)
            grad = inputs[i].grad
        model.zero_grad(set_to_none=True)
        if repeat == 0:
            forward, backward = [[] for _ in layers], [[] for _ in layers]
    return [statistics.median(f) for f in forward], [statistics.median(b) for b in backward]


def ping_pong(numel: int, dtype: torch.dtype, device: torch.device) -> float:
    """Median one-way seconds of a message of ``numel`` elements between ranks 0 and 1."""
    rank, buf, trips = dist.get_rank(), torch.zeros(numel, dtype=dtype, device=device), []
    dist.barrier()
    for _ in range(20 if rank < 2 else 0):
        _sync(device)
        start = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        else:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        _sync(device)
        trips.append((time.perf_counter() - start) / 2)
    dist.barrier()
    return statistics.median(trips) if trips else 0.0


def rank_main(cpu: bool, quick: bool) -> None:
    import lightning.pytorch as pl
    from bfpp_examples.gpt import GPT
    from torch.utils.data import DataLoader

    from lightning_bfpp import BFPPStrategy
    from lightning_bfpp.plan.schedule import GROUP_END
    from lightning_bfpp.plan.simulate import CostModel, simulate
    from lightning_bfpp.run.pipeline import step_schedule

    backend = "gloo" if cpu else "nccl"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if cpu else torch.device("cuda", rank % torch.cuda.device_count())
    if not cpu:
        torch.cuda.set_device(device)
    shape = QUICK if quick else COMPARE
    dtype = None if cpu else torch.bfloat16
    mbs, micro_batches = shape["micro_batch"], max(1, world // 2)
    warmup, timed = (1, 2) if quick else (3, 6)

    class CompareGPT(GPT):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=3e-4, weight_decay=0.0)

    def new_model() -> CompareGPT:
        torch.manual_seed(0)
        return CompareGPT(shape["vocab_size"], shape["seq_len"], shape["n_layer"], shape["n_head"], shape["n_embd"])

    def batches(count: int, size: int) -> list[dict[str, Tensor]]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, shape["vocab_size"], (count, size, shape["seq_len"] + 1), generator=g)
        return [{"input_ids": x[:, :-1], "labels": x[:, 1:]} for x in ids]

    model = new_model().to(device)
    fwd, bwd = profile_layers(model, batches(1, mbs)[0], device, dtype)
    del model
    boundary = mbs * shape["seq_len"] * shape["n_embd"]
    act_dtype = torch.float32 if cpu else torch.bfloat16
    small, large = ping_pong(1, act_dtype, device), ping_pong(boundary, act_dtype, device)
    boundary_bytes = boundary * act_dtype.itemsize
    bandwidth = boundary_bytes / max(large - small, 1e-9)

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.cpu: list[float] = []
            self._start = (0.0, 0.0)

        def on_train_batch_start(self, *args: Any) -> None:
            _sync(device)
            self._start = (time.perf_counter(), time.process_time())

        def on_train_batch_end(self, *args: Any) -> None:
            _sync(device)
            self.steps.append(time.perf_counter() - self._start[0])
            self.cpu.append(time.process_time() - self._start[1])

    rows = []
    for name, stages_per_rank in SCHEDULES:
        strategy = BFPPStrategy(
            pipeline_parallel_size=world,
            stages_per_rank=stages_per_rank,
            micro_batches=micro_batches,
            schedule=name,
            process_group_backend=backend,
            timeout=300,
        )
        clock = Clock()
        trainer = pl.Trainer(
            accelerator="cpu" if cpu else "gpu",
            devices=world,
            strategy=strategy,
            precision="32-true" if cpu else "bf16-mixed",
            max_steps=warmup + timed,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            callbacks=[clock],
        )
        data = batches(warmup + timed, mbs * micro_batches)
        trainer.fit(new_model(), train_dataloaders=DataLoader(data, batch_size=None))
        schedule = step_schedule(strategy.options, world, micro_batches)
        actions = sum(a != GROUP_END for a in schedule.actions[rank])  # D = 1: the pipeline rank
        host = statistics.median(clock.cpu[warmup:]) / actions
        hosts: list[Any] = [None] * world
        dist.all_gather_object(hosts, host)
        partition = strategy.stage_partition
        stages = range(partition.num_stages)
        cost = CostModel(
            forward_time=[sum(fwd[i] for i in partition.layers_of(s)) for s in stages],
            backward_time=[sum(bwd[i] for i in partition.layers_of(s)) for s in stages],
            boundary_bytes=boundary_bytes,
            p2p_latency=small,
            p2p_bandwidth=bandwidth,
            host_time=statistics.mean(hosts),
            host_blocking=cpu,
        )
        measured = statistics.median(clock.steps[warmup:])
        predicted = simulate(schedule, cost, record_events=False).step_time
        rows.append((name, stages_per_rank, measured, predicted, statistics.mean(hosts)))
    if rank == 0:
        print(
            f"gpu_compare: P={world} M={micro_batches} micro-batches of {mbs} sequences; p2p latency "
            f"{small * 1e6:.0f} us, bandwidth {bandwidth / 1e9:.2f} GB/s; forward+backward of all layers "
            f"{1e3 * (sum(fwd) + sum(bwd)):.1f} ms",
            flush=True,
        )
        for name, stages_per_rank, measured, predicted, host in rows:
            print(
                f"compare {name} L={stages_per_rank}: measured {measured * 1e3:.1f} ms predicted {predicted * 1e3:.1f} "
                f"ms ratio {measured / predicted:.3f} (host time per action {host * 1e6:.0f} us)",
                flush=True,
            )
        (_, _, bf, bf_sim, _), (_, _, ofob, ofob_sim, _) = rows
        print(
            f"gpu_compare devices={world} bf_over_1f1b={ofob / bf:.3f} predicted={ofob_sim / bf_sim:.3f} "
            f"measured_over_predicted_bf={bf / bf_sim:.3f} measured_over_predicted_1f1b={ofob / ofob_sim:.3f}",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    if spec["cpu"]:
        torch.set_num_threads(1)
    rank_main(spec["cpu"], spec["quick"])
