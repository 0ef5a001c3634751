"""Fixtures over the launcher (:mod:`launch`), and the ``multiprocess`` marker: every test that starts processes
through it gets the marker, so ``pytest -m "not multiprocess"`` runs the in-process tests only."""

from __future__ import annotations

import inspect
import json
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import launch
import pytest
from job_spec import TrainJobSpec
from launch import TESTS_DIR, JobResult, launch_ranks, run_python, run_script

__all__ = ["TESTS_DIR", "JobResult", "launch_ranks", "run_python", "run_script"]

# the fixture and the functions that start processes
LAUNCHING = {"run_job", "run_script", "run_python", "launch_ranks", "launch_jobs", "run_processes"}


@pytest.fixture
def run_job(tmp_path: Path) -> Callable[..., JobResult]:
    """``run_job(spec, timeout)`` runs tests/run_job.py with ``spec`` (a :class:`TrainJobSpec` or a dict of its fields;
    an unknown key raises ``TypeError``) on ``spec.devices`` processes; jobs of one test given different ``name``s
    keep their results apart."""

    def _run(
        config: TrainJobSpec | Mapping[str, Any], timeout: float = 120, expect_success: bool = True, name: str = "out"
    ) -> JobResult:
        out_dir = tmp_path / name
        out_dir.mkdir(exist_ok=True)
        spec = TrainJobSpec.from_dict(config).replaced(out_dir=str(out_dir))
        spec_path = tmp_path / f"{name}.json"
        spec_path.write_text(json.dumps(spec.to_dict()))
        code, output = run_script(TESTS_DIR / "run_job.py", [str(spec_path)], timeout)
        if expect_success and code != 0:
            pytest.fail(f"job failed with exit code {code}:\n{output[-6000:]}")
        return JobResult(code, output, out_dir)

    return _run


def _names(code: types.CodeType) -> set[str]:
    """The global names ``code`` and the functions nested in it refer to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _launches(function: Callable[..., Any], seen: set[Any]) -> bool:
    """Whether ``function`` uses a launching name, itself or through a function of the tests' modules it calls."""
    code = getattr(inspect.unwrap(function), "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    names = _names(code)
    if names & LAUNCHING:
        return True
    module = inspect.getmodule(function)
    helpers = [getattr(module, name, None) for name in names]
    return any(
        inspect.isfunction(helper) and Path(inspect.getfile(helper)).parent == TESTS_DIR and _launches(helper, seen)
        for helper in helpers
    )


def starts_processes(item: pytest.Function) -> bool:
    """Whether the test uses a launching fixture, or starts processes itself or through helpers it calls."""
    return bool(LAUNCHING & set(item.fixturenames)) or _launches(item.function, set())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.Function) and starts_processes(item):
            item.add_marker(pytest.mark.multiprocess)


@pytest.fixture(autouse=True)
def _only_marked_tests_start_processes(request: pytest.FixtureRequest) -> Any:
    """A test the marker missed (it starts processes in a way the hook does not see) fails instead of slowing the
    in-process run."""
    if request.node.get_closest_marker("multiprocess") is None:
        launch.UNMARKED_TEST[:] = [request.node.nodeid]
    yield
    launch.UNMARKED_TEST.clear()
