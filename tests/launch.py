"""Starts one process per rank as torchrun does (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT`` set), so that a test
sees every rank's exit code, exit time and output; bounded, and kills only the processes it started."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class RankExit:
    returncode: int | None  # None: still running at the deadline (then killed)
    seconds: float  # from the start until it ended
    output: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script: Path, config: dict[str, Any], world: int, work_dir: Path, timeout: float) -> list[RankExit]:
    """Runs ``script config.json`` as ranks ``0..world-1``; waits at most ``timeout`` seconds, then kills the rest."""
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / "config.json"
    config_path.write_text(json.dumps(config))
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1")
        env.update(MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))
        log = open(work_dir / f"rank{rank}.log", "w+")  # noqa: SIM115 (closed below)
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        )
    start = time.monotonic()
    ended: dict[int, float] = {}
    while len(ended) < world and time.monotonic() - start < timeout:
        for rank, proc in enumerate(procs):
            if rank not in ended and proc.poll() is not None:
                ended[rank] = time.monotonic() - start
        time.sleep(0.05)
    exits = []
    for rank, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        if rank not in ended:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        exits.append(RankExit(proc.returncode if rank in ended else None, ended.get(rank, timeout), log.read()))
        log.close()
    return exits
