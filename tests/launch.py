"""Starts test jobs as bounded subprocesses and kills only what they started.

Three entry points share one bounded run (:func:`run_processes`):

- :func:`run_script` starts one Python process, which may let Lightning start the other ranks itself;
- :func:`launch_ranks` starts every rank itself, as torchrun does (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``
  set), so that a test sees every rank's exit code, exit time and output;
- :func:`launch_jobs` starts several such jobs side by side, calling the test while they run (to send signals).

Each process runs in a session of its own. A process has ended when it exited and nothing it started still holds its
output open; at the deadline, or if the test is interrupted, its whole session is SIGKILLed (a hung gloo collective
ignores SIGTERM). Nothing else is signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job_spec import JobSpec, spec_for

TESTS_DIR = Path(__file__).resolve().parent
UNMARKED_TEST: list[str] = []  # set by tests/conftest.py: the running test, if it lacks the multiprocess marker
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


@dataclass(frozen=True)
class ProcessExit:
    """How one started process ended."""

    returncode: int | None  # None: still running at the deadline (then killed)
    seconds: float  # from the start until the process exited (the deadline if it did not)
    output: str  # its stdout and stderr, and those of the processes it started
    timed_out: bool  # it, or a process it started, was still running at the deadline


class JobResult:
    """A finished run of ``run_job.py``: exit code, output, and the per-rank results it wrote to ``out_dir``."""

    def __init__(self, returncode: int, output: str, out_dir: Path) -> None:
        self.returncode, self.output, self.out_dir = returncode, output, out_dir

    def rank(self, r: int) -> dict[str, Any]:
        import torch

        return torch.load(self.out_dir / f"rank{r}.pt", weights_only=False)

    def ranks(self) -> list[dict[str, Any]]:
        return [self.rank(int(p.stem[4:])) for p in sorted(self.out_dir.glob("rank*.pt"))]


def job_environment(**variables: str) -> dict[str, str]:
    """This process's environment for a job: one thread per process, unbuffered output, no launcher variables of an
    enclosing job, then ``variables``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **variables)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Started:
    """One process in its own session, its output read by a thread until every holder of the pipe has closed it.
    A test's ``watch`` (see :func:`run_processes`) sees it as a :class:`Running`."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str], cwd: Path | None) -> None:
        self.proc = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.exited_at: float | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):
            self.chunks.append(chunk)

    def has_exited(self) -> bool:
        """Whether the process exited; it stays a zombie (not reaped), so its session id cannot be reused until
        :meth:`finish`."""
        return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None

    def finish(self) -> None:
        """SIGKILLs whatever is left of the session, reaps the process and collects its output."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join(timeout=10)
        if not self.reader.is_alive():  # else a process that left the session holds the pipe: leave it to it
            assert self.proc.stdout is not None
            self.proc.stdout.close()

    @property
    def output(self) -> str:
        return b"".join(self.chunks).decode("utf-8", errors="replace")

    @property
    def pid(self) -> int:
        return self.proc.pid


Running = _Started  # what a watch sees of a running process: pid, output (so far), exited_at (seconds, or None)


def live_session_members(session: int) -> list[int]:
    """The processes of ``session`` (the pid of a process started here: each has its own) that are alive, zombies
    not counted, from the process table (``/proc``)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, session
        except (OSError, IndexError):
            continue  # it ended meanwhile
        if fields[0] != "Z" and int(fields[3]) == session:
            members.append(int(stat.parent.name))
    return members


def run_processes(
    commands: Sequence[Sequence[str]],
    envs: Sequence[Mapping[str, str]],
    timeout: float,
    cwd: Path | None = None,
    watch: Callable[[float, Sequence[Running]], None] | None = None,
) -> list[ProcessExit]:
    """Runs ``commands`` side by side (``envs``: one environment each) until all have ended or ``timeout`` seconds
    passed, then kills what is left of each one's session; ``watch(seconds, processes)`` is called every 50 ms
    meanwhile."""
    if UNMARKED_TEST:
        raise RuntimeError(f"{UNMARKED_TEST[0]} starts processes without the multiprocess marker (tests/conftest.py)")
    started: list[_Started] = []
    start = time.monotonic()
    try:
        for command, env in zip(commands, envs, strict=True):
            started.append(_Started(command, env, cwd))
        while time.monotonic() - start < timeout:
            for process in started:
                if process.exited_at is None and process.has_exited():
                    process.exited_at = time.monotonic() - start
            if watch is not None:
                watch(time.monotonic() - start, started)
            if all(p.exited_at is not None and not p.reader.is_alive() for p in started):
                break
            time.sleep(0.05)
    finally:  # also when the test is interrupted (pytest-timeout, Ctrl-C): nothing outlives it
        timed_out = [p.exited_at is None or p.reader.is_alive() for p in started]
        for process in started:
            process.finish()
    return [
        ProcessExit(
            returncode=p.proc.returncode if p.exited_at is not None else None,
            seconds=p.exited_at if p.exited_at is not None else timeout,
            output=p.output,
            timed_out=late,
        )
        for p, late in zip(started, timed_out, strict=True)
    ]


def run_python(
    args: Sequence[str], timeout: float, cwd: Path | None = None, name: str = "", **variables: str
) -> tuple[int, str]:
    """Runs ``python <args>`` (a script and its arguments, ``-m module ...`` or ``-c code``) bounded, with
    ``variables`` added to :func:`job_environment`; returns its exit code and output. Fails the test, naming the run
    by ``name`` or its arguments, if it or a process it started is still running after ``timeout`` seconds (all
    killed)."""
    (ended,) = run_processes([[sys.executable, *args]], [job_environment(**variables)], timeout, cwd)
    if ended.timed_out:
        import pytest

        label = name or " ".join(args)[:200]
        pytest.fail(f"{label} did not finish within {timeout:.0f} s (killed):\n{ended.output[-4000:]}")
    assert ended.returncode is not None
    return ended.returncode, ended.output


def run_script(script: Path, args: Sequence[str], timeout: float, cwd: Path | None = None) -> tuple[int, str]:
    """Runs ``python script args`` bounded, as :func:`run_python`."""
    return run_python([str(script), *args], timeout, cwd)


def launch_ranks(
    script: Path, config: JobSpec | Mapping[str, Any] | None, world: int, work_dir: Path, timeout: float
) -> list[ProcessExit]:
    """Runs ``script config.json`` as ranks ``0..world-1``, the config written there as the script's job spec (a spec,
    or a dict of its fields: an unknown key raises ``TypeError`` before anything starts; None for a script that reads
    none); waits at most ``timeout`` seconds, then kills the rest. Each rank's output also goes to
    ``work_dir/rank<r>.log``."""
    spec = spec_for(script.name, config) if config is not None else None
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / "config.json"
    config_path.write_text(json.dumps(spec.to_dict() if spec is not None else {}))
    port = str(free_port())
    ranks = [
        job_environment(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, LOCAL_RANK=str(r), NODE_RANK="0", WORLD_SIZE=str(world)
        )
        for r in range(world)
    ]
    exits = run_processes([[sys.executable, str(script), str(config_path)]] * world, ranks, timeout)
    for rank, ended in enumerate(exits):
        (work_dir / f"rank{rank}.log").write_text(ended.output)
    return exits


@dataclass
class LaunchedJob:
    """A job of :func:`launch_jobs`: its config, its ranks' processes while they run (by rank) and, once every rank
    exited, the live processes left in their sessions (see :func:`live_session_members`)."""

    name: str
    config: Mapping[str, Any]
    work_dir: Path
    ranks: list[Running]
    left_behind: list[int] | None = None  # None until every rank exited
    notes: dict[str, Any] = field(default_factory=dict)  # the test's own (what it sent, when)


def launch_jobs(
    script: Path,
    configs: Mapping[str, Mapping[str, Any]],
    work_dir: Path,
    timeout: float,
    watch: Callable[[float, list[LaunchedJob]], None],
) -> dict[str, tuple[LaunchedJob, list[ProcessExit]]]:
    """Runs one job of ``script`` per entry of ``configs`` (name: a spec's fields, ``devices`` ranks, as
    :func:`launch_ranks`), all side by side, under ``work_dir/<name>``; ``watch(seconds, jobs)`` is called every 50
    ms. Returns each job and its ranks' exits; each rank's output also goes to ``work_dir/<name>/rank<r>.log``."""
    commands, envs, layout = [], [], []
    for name, config in configs.items():
        job_dir = work_dir / name
        job_dir.mkdir(parents=True, exist_ok=True)
        spec = spec_for(script.name, config)
        (job_dir / "config.json").write_text(json.dumps(spec.to_dict()))
        port, world = str(free_port()), int(config["devices"])
        for r in range(world):
            commands.append([sys.executable, str(script), str(job_dir / "config.json")])
            envs.append(
                job_environment(
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=port, LOCAL_RANK=str(r), NODE_RANK="0", WORLD_SIZE=str(world)
                )
            )
        layout.append((name, config, job_dir, world))
    jobs: list[LaunchedJob] = []

    def watch_jobs(seconds: float, started: Sequence[Running]) -> None:
        if not jobs:  # every process has started
            first = 0
            for name, config, job_dir, world in layout:
                jobs.append(LaunchedJob(name, config, job_dir, list(started[first : first + world])))
                first += world
        for job in jobs:
            if job.left_behind is None and all(p.exited_at is not None for p in job.ranks):
                job.left_behind = [m for p in job.ranks for m in live_session_members(p.pid)]
        watch(seconds, jobs)

    exits = run_processes(commands, envs, timeout, watch=watch_jobs)
    results, first = {}, 0
    for job in jobs:
        job_exits = exits[first : first + len(job.ranks)]
        first += len(job.ranks)
        for rank, ended in enumerate(job_exits):
            (job.work_dir / f"rank{rank}.log").write_text(ended.output)
        results[job.name] = (job, job_exits)
    return results


def bounded_run(command: Sequence[str], timeout: float, **variables: str) -> tuple[int | None, str]:
    """Runs ``command`` (with ``variables`` added to :func:`job_environment`) bounded, as a script outside pytest
    does; returns its exit code (None if it, or a process it started, was still running at the bound: all killed)
    and its output."""
    (ended,) = run_processes([command], [job_environment(**variables)], timeout)
    return (None if ended.timed_out else ended.returncode), ended.output
