"""The host never waits inside a steady-state training step: the package reads device values on the host only through
``lightning_bfpp.run.host_sync``, and at most once per rank per step once the batch's shapes are known."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from launch import JobResult

from lightning_bfpp.plan.schedule import SCHEDULES

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_bfpp"
HOST_SYNC = PACKAGE / "run" / "host_sync.py"
READING_METHODS = {"item", "tolist", "cpu", "numpy"}


STRATEGY = {"pipeline_parallel_size": 2, "stages_per_rank": 2, "micro_batches": 2}


def _runs() -> list[dict]:
    runs = []
    for schedule in SCHEDULES:  # every schedule, gradients averaged
        per_rank = 1 if schedule in ("1f1b", "gpipe") else 2
        runs.append({"name": schedule, "strategy": {**STRATEGY, "schedule": schedule, "stages_per_rank": per_rank}})
    for sharding in ("optimizer", "gradients", "full"):  # every sharding mode, breadth-first
        runs.append({"name": f"bf-{sharding}", "strategy": {**STRATEGY, "sharding": sharding}})
    runs.append({"name": "bf-batched-w", "strategy": {**STRATEGY, "weight_gradients": "batched"}})
    return runs


@pytest.mark.timeout(900)  # eight fits in one launch: about 60 s on an idle 2-core machine, more under load
def test_at_most_one_host_read_per_rank_per_steady_step(run_job) -> None:
    """P=2 x D=2, every schedule and sharding mode, one launch: after the first step (which learns the shapes of every
    stage boundary and the layout of the logged values) each rank reads device values once per step, through
    ``host_sync``, and nowhere else. The later fits reuse the first fit's process groups."""
    runs = _runs()
    config = {
        "devices": 4,
        "strategy": STRATEGY,
        "model": {"num_blocks": 4, "optimizer": "adam"},
        "batch_size": 4,
        "max_steps": 4,
        "count_host_reads": True,
        "pg_timeout": 180,  # eight fits of four processes on two cores
        "runs": runs,
    }
    result = run_job(config, timeout=850)
    groups = {}  # the process groups each rank holds after each fit: created by the first, reused by the others
    for run in runs:
        groups[run["name"]] = [r["process_groups"] for r in JobResult(0, "", result.out_dir / run["name"]).ranks()]
    message = f"later fits of the same layout added process groups: {groups}"
    assert len({tuple(g) for g in groups.values()}) == 1, message
    for run in runs:
        ranks = JobResult(0, result.output, result.out_dir / run["name"]).ranks()
        assert len(ranks) == 4, run["name"]
        for rank in ranks:
            steps = rank["host_reads"]
            assert len(steps) == 4, (run["name"], steps)
            for number, step in enumerate(steps[1:], start=1):
                where = f"{run['name']}, rank {rank['rank']}, step {number}: {step}"
                assert step["elsewhere"] == 0, f"a host read outside host_sync: {where}"
                assert step["host_sync"] <= 1, f"more than one host read: {where}"


def _reads_outside_host_sync(path: Path) -> list[str]:
    """The calls in ``path`` that read a device value on the host or copy host data to the device: ``.item()``,
    ``.tolist()``, ``.cpu()``, ``.numpy()``, ``float(...)`` (unless its argument is a literal), ``torch.tensor(...)``
    with a device (unless the CPU) and ``torch.tensor(...).to(device)``."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        where = f"{path.name}:{node.lineno}"
        if isinstance(func, ast.Attribute) and func.attr in READING_METHODS and not node.args:
            found.append(f"{where} .{func.attr}()")
        elif isinstance(func, ast.Name) and func.id == "float" and node.args:
            if not isinstance(node.args[0], ast.Constant):
                found.append(f"{where} float(...)")
        elif _uploads(node):
            found.append(f"{where} a copy of host data to a device")
    return found


def _uploads(node: ast.Call) -> bool:
    func = node.func
    device = next((k.value for k in node.keywords if k.arg == "device"), None)
    cpu = isinstance(device, ast.Constant) and device.value == "cpu"
    if isinstance(func, ast.Attribute) and func.attr == "tensor" and device is not None and not cpu:
        return True  # torch.tensor(host values, device=...)
    if isinstance(func, ast.Attribute) and func.attr == "to" and node.args:
        first = node.args[0]
        return isinstance(first, ast.Name) and first.id == "device" and _is_host_built(func.value)
    return False


def _is_host_built(value: ast.expr) -> bool:
    """Whether ``value`` is a tensor built from host data in the same expression (``torch.tensor(...)``)."""
    return isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "tensor"


def test_no_host_read_outside_host_sync() -> None:
    """A source check: only ``run/host_sync.py`` reads device values on the host or uploads host data (lines marked
    ``# host number`` convert Python numbers, not tensors)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == HOST_SYNC or path.parts[-2] == "plan":  # plan/ imports no torch
            continue
        lines = path.read_text().splitlines()
        for read in _reads_outside_host_sync(path):
            line = int(read.split(":")[1].split()[0])
            if "# host number" not in lines[line - 1]:
                found.append(f"{path.relative_to(PACKAGE.parent)}: {read}")
    assert not found, "device values read or host data uploaded outside run/host_sync.py:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    ["x.item()", "x.tolist()", "x.cpu()", "float(x)", "torch.tensor([1], device=d)", "torch.tensor(v).to(device)"],
)
def test_source_check_finds_each_kind_of_read(tmp_path: Path, source: str) -> None:
    path = tmp_path / "module.py"
    path.write_text(f"def f(x, d, v, device):\n    return {source}\n")
    assert len(_reads_outside_host_sync(path)) == 1
    path.write_text("def f(x, d, v, device):\n    return float(1), torch.tensor(v), x.to(device), x.cpu(1)\n")
    assert _reads_outside_host_sync(path) == []
