"""Signals and hangs on real processes: SIGTERM, SIGINT or SIGKILL to either rank of a running job, SIGTERM to all
ranks (with the SLURM requeue signal before it), a rank that hangs past the timeout, and a signalled rank blocked in a
transfer. Every rank of every job must end on its own, non-zero, within 60 s, saying why, and leave no process.

All jobs run side by side in one launch (P = 2, two processes each) of ``fault_job.py``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from launch import LaunchedJob, launch_jobs

TESTS = Path(__file__).resolve().parent
BASE = {
    "model": {"num_blocks": 2},
    "batch_size": 4,
    "max_steps": 100_000,  # until signalled
    "pg_timeout": 60,
    "devices": 2,
    "strategy": {"pipeline_parallel_size": 2, "micro_batches": 2},
}
ONE_RANK = {  # job name: (signal, the rank it is sent to)
    f"{name.lower()[3:]}{rank}": (signum, rank)
    for signum, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT"), (signal.SIGKILL, "SIGKILL"))
    for rank in (0, 1)
}
GRACES = {"signal_grace": 3, "end_grace": 3}


def _configs(work: Path) -> dict[str, dict[str, Any]]:
    def job(name: str, **faults: Any) -> dict[str, Any]:
        return {**BASE, "checkpoint_dir": str(work / name / "checkpoints"), "faults": {**faults, **GRACES}}

    configs = {name: job(name, save_on_exception=True) for name in ONE_RANK}
    configs["slurm"] = job("slurm", save_on_exception=True, slurm=True)
    configs["hang1"] = {**job("hang1", hang_rank=1, hang_step=2), "pg_timeout": 20}
    configs["hang0-term1"] = job("hang0-term1", hang_rank=0, hang_step=2)
    for name, config in configs.items():
        config["out_dir"] = str(work / name)
    return configs


def _finished(process: Any, step: int) -> bool:
    return f"finished global step {step}" in process.output


def _send(job: LaunchedJob, seconds: float, signum: int, ranks: tuple[int, ...]) -> None:
    for rank in ranks:
        os.kill(job.ranks[rank].pid, signum)
    job.notes.setdefault("sent", []).append((seconds, signum, ranks))


def _drive(seconds: float, jobs: list[LaunchedJob]) -> None:
    """Sends each job's signals once its ranks are where the test wants them."""
    for job in jobs:
        sent = len(job.notes.get("sent", []))
        if job.name in ONE_RANK and not sent and all(_finished(p, 2) for p in job.ranks):
            _send(job, seconds, *(ONE_RANK[job.name][0], (ONE_RANK[job.name][1],)))
        elif job.name == "slurm" and not sent and all(_finished(p, 2) for p in job.ranks):
            _send(job, seconds, signal.SIGUSR1, (0, 1))  # Slurm's --signal=USR1@...: every task
        elif job.name == "slurm" and sent == 1 and (job.work_dir / "scontrol.txt").exists():
            _send(job, seconds, signal.SIGTERM, (0, 1))  # the end of the time limit: every task at once
        elif job.name == "hang0-term1" and not sent and "global rank 0 hangs" in job.ranks[0].output:
            job.notes.setdefault("hang_seen", seconds)
            if seconds - job.notes["hang_seen"] > 1:  # rank 1 now waits in a transfer from rank 0
                _send(job, seconds, signal.SIGTERM, (1,))


def _saved_step(checkpoints: Path) -> int:
    """The global step of the one checkpoint ``ModelCheckpoint(save_on_exception=True)`` wrote."""
    (saved,) = [p for p in checkpoints.iterdir() if p.name.endswith(".ckpt")]
    return torch.load(saved / "meta.pt", weights_only=True)["global_step"]


@pytest.mark.timeout(900)
def test_signals_and_hangs_end_every_rank(tmp_path: Path) -> None:
    results = launch_jobs(TESTS / "fault_job.py", _configs(tmp_path), tmp_path, timeout=420, watch=_drive)

    def report(name: str) -> str:
        job, exits = results[name]
        return f"{name}: sent {job.notes.get('sent')}\n" + "\n".join(
            f"--- rank {r} exit {e.returncode} at {e.seconds:.1f} s:\n{e.output[-2500:]}" for r, e in enumerate(exits)
        )

    for name, (job, exits) in results.items():
        # every rank ended on its own (none killed at the deadline), and no process of the job is left
        assert all(not e.timed_out for e in exits), report(name)
        assert job.left_behind == [], report(name)
        assert all(e.returncode != 0 for e in exits), report(name)

    for name, (signum, target) in ONE_RANK.items():
        job, exits = results[name]
        assert job.notes.get("sent"), report(name)
        sent_at = job.notes["sent"][0][0]
        assert all(e.seconds - sent_at < 60 for e in exits), report(name)
        if signum == signal.SIGKILL:
            assert exits[target].returncode == -signal.SIGKILL, report(name)
            other = exits[1 - target].output
            assert "RankLostError" in other and f"lost global rank {target}" in other, report(name)
            continue
        name_of = signal.Signals(signum).name
        for ended in exits:  # every rank stops at the same step, says why, and exits 128 + signal
            assert ended.returncode == 128 + signum, report(name)
            assert f"global rank {target} received {name_of}: every rank stops" in ended.output, report(name)
        assert _saved_step(job.work_dir / "checkpoints") > 2, report(name)  # save_on_exception saved, as Lightning

    job, exits = results["slurm"]
    assert [s[1] for s in job.notes.get("sent", [])] == [signal.SIGUSR1, signal.SIGTERM], report("slurm")
    assert (job.work_dir / "scontrol.txt").read_text().split() == ["requeue", "4242"], report("slurm")
    hpc = torch.load(job.work_dir / "hpc_ckpt_1.ckpt" / "meta.pt", weights_only=True)
    assert [e.returncode for e in exits] == [143, 143], report("slurm")
    assert hpc["global_step"] < _saved_step(job.work_dir / "checkpoints"), report("slurm")
    assert all("received SIGTERM: every rank stops" in e.output for e in exits), report("slurm")

    job, exits = results["hang1"]  # rank 0 gives up at the 20 s timeout; hung rank 1 is ended 3 s later
    assert "lost global rank 1" in exits[0].output, report("hang1")
    assert exits[1].returncode == 1 and "the job is ending" in exits[1].output, report("hang1")
    assert exits[1].seconds - exits[0].seconds < 30, report("hang1")

    job, exits = results["hang0-term1"]  # rank 1, blocked in a transfer, gets SIGTERM; hung rank 0 goes after it
    sent_at = job.notes["sent"][0][0]
    assert exits[1].returncode == 143 and "could not stop together" in exits[1].output, report("hang0-term1")
    assert exits[0].returncode == 1 and "received SIGTERM" in exits[0].output, report("hang0-term1")
    assert all(e.seconds - sent_at < 60 for e in exits), report("hang0-term1")


def test_a_signal_is_recorded_and_agreed_on_without_running_anything_in_the_handler() -> None:
    """In-process, one rank: SIGTERM to this process while the watch owns it does nothing but record it (the test
    process lives on); the step boundary's agreement returns it once, naming the rank; released, nothing is left."""
    import time

    from lightning_bfpp.run.job_watch import AgreedSignal, JobWatch

    watch = JobWatch()
    before = signal.getsignal(signal.SIGTERM)
    watch.own_signals({signal.SIGTERM: None})
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        end = time.monotonic() + 10
        while signal.SIGTERM not in watch.pending():
            assert time.monotonic() < end, "the watch thread did not record the signal"
            time.sleep(0.01)
        assert watch.agreed(watch.signal_flags(1), 1) == [AgreedSignal(signal.SIGTERM, 0, 0)]
        assert watch.agreed(watch.signal_flags(1), 1) == []  # once
    finally:
        watch.release_signals()
        signal.signal(signal.SIGTERM, before)
