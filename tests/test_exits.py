"""Every rank of a successful run exits 0: a rank that finished its work must not abort at interpreter exit."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import run_script

TESTS = Path(__file__).resolve().parent
LAUNCHES = 20


def test_every_rank_exits_zero_after_a_fit_beside_a_busy_core() -> None:
    """20 one-step two-rank fits, each rank a fresh process that ends through interpreter finalization, beside a
    CPU-bound process (as on a loaded CI machine). Before the fix a gloo worker thread could free a finished
    collective during finalization and abort the rank (SIGABRT, exit -6)."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        code, output = run_script(TESTS / "exit_job.py", [str(LAUNCHES), "30"], timeout=150)
    finally:
        busy.kill()
        busy.wait()
    launches = re.findall(r"^launch \d+: (.*)$", output, re.MULTILINE)
    assert code == 0 and len(launches) == LAUNCHES, output[-4000:]
    failed = [(i, codes) for i, codes in enumerate(launches) if codes != "0 0"]
    assert not failed, f"ranks ended non-zero (launch, exit codes): {failed}\n{output[-4000:]}"
