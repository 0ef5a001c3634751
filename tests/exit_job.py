"""Runs a one-step two-rank fit many times and reports how every rank's process ended.

    python tests/exit_job.py LAUNCHES [TIMEOUT_SECONDS]

The imports are done once; each rank of each launch is a process forked from this one (as torchrun would start it:
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT`` set) that fits and then ends as a script does, through interpreter
finalization. Prints ``launch <i>: <exit code of rank 0> <exit code of rank 1>`` per launch (a negative code is the
signal that ended the rank, ``None`` a rank still running at the deadline, then killed) and, last,
``exits: <launches> launches, <n> ranks ended non-zero``.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launch import free_port
from models import StackModel, loader

from lightning_bfpp import BFPPStrategy

WORLD = 2


def fit_rank(rank: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(WORLD)
    )
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=BFPPStrategy(pipeline_parallel_size=WORLD, micro_batches=2, timeout=20),
        precision="64-true",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(StackModel(num_blocks=2), train_dataloaders=loader(4, size=8))
    # as scripts end: every rank's result gathered, then a barrier before leaving
    results = [None] * WORLD
    torch.distributed.all_gather_object(results, float(trainer.callback_metrics.get("train_loss", 0.0)))
    trainer.strategy.barrier()


def launch(timeout: float) -> list[int | None]:
    """Forks one process per rank; returns their exit codes (``None``: killed at the deadline)."""
    port = free_port()
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for rank in range(WORLD):
        pid = os.fork()
        if pid == 0:  # the rank: fit, then end through the interpreter's normal exit (where the aborts happened)
            fit_rank(rank, port)
            raise SystemExit(0)
        pids.append(pid)
    codes: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(codes) < WORLD and time.monotonic() < deadline:
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                codes[pid] = os.waitstatus_to_exitcode(status)  # -6: ended by SIGABRT
        time.sleep(0.02)
    for pid in pids:
        if pid not in codes:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return [codes.get(pid) for pid in pids]


def main() -> int:
    launches = int(sys.argv[1])
    timeout = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
    gc.freeze()  # the forked ranks then neither traverse nor copy this process's objects: ~1.5 s a launch, not ~6 s
    failed = 0
    for i in range(launches):
        codes = launch(timeout)
        failed += sum(code != 0 for code in codes)
        print(f"launch {i}: {' '.join(map(str, codes))}", flush=True)
    print(f"exits: {launches} launches, {failed} ranks ended non-zero", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
