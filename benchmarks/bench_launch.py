"""Process launching for the benchmarks: one bounded command, its output, and nothing left running afterwards.

The command runs in a session of its own with one thread per process (``OMP_NUM_THREADS=1``), unbuffered output and
no launcher variables of an enclosing job. At the bound, or if the caller is interrupted, the whole session is
SIGKILLed (a hung gloo collective ignores SIGTERM); nothing outside it is signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence

LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def free_port() -> int:
    """A TCP port that was free a moment ago (for ``--master-port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**variables: str) -> dict[str, str]:
    """This process's environment without launcher variables, one thread per process, unbuffered, plus
    ``variables``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **variables)
    return env


def bounded_run(command: Sequence[str], timeout: float, echo: bool = False, **variables: str) -> tuple[int | None, str]:
    """Runs ``command`` for at most ``timeout`` seconds; returns its exit code (None when it was still running at the
    bound, and then killed with everything it started) and its output (stdout and stderr). ``echo`` also prints the
    output as it comes."""
    proc = subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=environment(**variables),
        start_new_session=True,
    )
    chunks: list[bytes] = []

    def read() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            chunks.append(chunk)
            if echo:
                print(chunk.decode("utf-8", errors="replace"), end="", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline, finished = time.monotonic() + timeout, False
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                reader.join(timeout=max(0.0, deadline - time.monotonic()))  # children may still hold the pipe
                finished = not reader.is_alive()
                break
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the session: the command and whatever it started
        proc.wait()
        reader.join(timeout=5)
    output = b"".join(chunks).decode("utf-8", errors="replace")
    return (proc.returncode if finished else None), output
