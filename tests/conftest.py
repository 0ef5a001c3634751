"""Runs multi-process jobs as bounded subprocesses and kills only what they started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parent


class JobResult:
    def __init__(self, returncode: int, output: str, out_dir: Path) -> None:
        self.returncode, self.output, self.out_dir = returncode, output, out_dir

    def rank(self, r: int) -> dict[str, Any]:
        import torch

        return torch.load(self.out_dir / f"rank{r}.pt", weights_only=False)

    def ranks(self) -> list[dict[str, Any]]:
        return [self.rank(int(p.stem[4:])) for p in sorted(self.out_dir.glob("rank*.pt"))]


def run_script(script: Path, args: list[str], timeout: float, cwd: Path | None = None) -> tuple[int, str]:
    """Runs ``script`` in its own session; on timeout kills that session (a hung gloo op ignores SIGTERM)."""
    return run_command([sys.executable, str(script), *args], timeout, cwd, name=script.name)


def run_command(
    command: list[str], timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None, name: str = ""
) -> tuple[int, str]:
    """Runs ``command`` as :func:`run_script` does, with ``env`` added to the environment; ``name`` labels a timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("LOCAL_RANK", None)
    env.pop("MASTER_PORT", None)
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{name or command[0]} did not finish within {timeout:.0f} s (killed):\n{output[-4000:]}")
    return proc.returncode, output


@pytest.fixture
def run_job(tmp_path: Path):
    """``run_job(config, timeout)`` runs tests/run_job.py with ``config`` on ``config['devices']`` processes; jobs of
    one test given different ``name``s keep their results apart."""

    def _run(config: dict[str, Any], timeout: float = 120, expect_success: bool = True, name: str = "out") -> JobResult:
        out_dir = tmp_path / name
        out_dir.mkdir(exist_ok=True)
        config = {**config, "out_dir": str(out_dir)}
        config_path = tmp_path / f"{name}.json"
        config_path.write_text(json.dumps(config))
        code, output = run_script(TESTS_DIR / "run_job.py", [str(config_path)], timeout)
        if expect_success and code != 0:
            pytest.fail(f"job failed with exit code {code}:\n{output[-6000:]}")
        return JobResult(code, output, out_dir)

    return _run
