"""Every ``python`` block of README.md and the documentation runs as written (see :mod:`docs_blocks` for the markers),
and the quick start's claim holds: on 2 CPU processes it prints the losses of the same file run on one process."""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script
from docs_blocks import ROOT, Block, all_blocks

BLOCKS = all_blocks()
LOSS = re.compile(r"^batch (\d+) loss ([0-9.]+)$", re.M)


def test_blocks_are_found_and_every_skip_says_why() -> None:
    readme = [b for b in BLOCKS if b.path == ROOT / "README.md"]
    assert [b.kind for b in readme] == ["script"], "README's python block is the quick start, run as a script"
    assert any(b.kind == "run" for b in BLOCKS)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "run"], ids=lambda b: b.where)
def test_block_runs_as_written(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # whatever it writes goes there
    exec(compile(block.code, block.where, "exec"), {"__name__": "__main__"})


def quick_start() -> Block:
    """README's quick start; every block run as a script must be a copy of it, so that one launch covers them."""
    scripts = [b for b in BLOCKS if b.kind == "script"]
    (readme,) = [b for b in scripts if b.path == ROOT / "README.md"]
    for block in scripts:
        assert block.code == readme.code, f"{block.where} differs from README's quick start: give it a launch here"
    return readme


@contextlib.contextmanager
def isolated_seeding() -> Iterator[None]:
    """Undoes what ``seed_everything`` changes in this process: the random states and ``PL_GLOBAL_SEED``."""
    python_state, numpy_state, seed = random.getstate(), np.random.get_state(), os.environ.get("PL_GLOBAL_SEED")
    try:
        with torch.random.fork_rng():
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        os.environ.pop("PL_GLOBAL_SEED", None)
        if seed is not None:
            os.environ["PL_GLOBAL_SEED"] = seed


def losses(output: str) -> dict[int, float]:
    return {int(batch): float(loss) for batch, loss in LOSS.findall(output)}


def test_quick_start_trains_on_two_processes_with_the_losses_of_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = quick_start()
    script = tmp_path / "quickstart.py"
    script.write_text(block.code)
    code, output = run_script(script, [], timeout=240, cwd=tmp_path)
    assert code == 0, output[-4000:]
    pipelined = losses(output)
    assert sorted(pipelined) == list(range(16)), output[-4000:]

    # the same file with `auto`, in this process
    namespace: dict[str, object] = {"__name__": "quickstart"}
    exec(compile(block.code, block.where, "exec"), namespace)
    printed = io.StringIO()
    monkeypatch.chdir(tmp_path)  # the one-process run writes lightning_logs/ there
    with isolated_seeding(), contextlib.redirect_stdout(printed):
        namespace["main"]("auto")  # type: ignore[operator]
    one_process = losses(printed.getvalue())
    assert sorted(one_process) == list(range(16))
    for batch in range(16):  # equal up to float32 rounding, printed to 6 decimals
        assert abs(pipelined[batch] - one_process[batch]) <= 1e-5, (batch, pipelined, one_process)
