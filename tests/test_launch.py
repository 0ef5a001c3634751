"""The test harness itself: job specs refuse keys they do not know; the launcher bounds every job, kills what it
started at the bound, and waits for what a job started before calling it ended."""

from __future__ import annotations

import sys
import time

import pytest
from job_spec import EvalJobSpec, FaultJobSpec, TrainJobSpec
from launch import job_environment, run_processes, run_python


@pytest.mark.parametrize(
    ("spec_class", "config", "key"),
    [
        pytest.param(TrainJobSpec, {"batch_size": 4, "max_step": 2}, "max_step", id="train"),
        pytest.param(TrainJobSpec, {"batch_size": 4, "runs": [{"name": "a", "acumulate": 2}]}, "acumulate", id="run"),
        pytest.param(TrainJobSpec, {"batch_size": 4, "rank_overrides": {"1": {"strat": {}}}}, "strat", id="rank"),
        pytest.param(FaultJobSpec, {"batch_size": 4, "fault": {"nan_step": 1}}, "fault", id="fault"),
        pytest.param(EvalJobSpec, {"root_dir": "r", "stages": [{"name": "fit", "action": []}]}, "action", id="stage"),
        pytest.param(EvalJobSpec, {"root_dir": "r", "stages": [], "data": {"batchsize": 8}}, "batchsize", id="data"),
    ],
)
def test_a_misspelt_key_fails_naming_it(spec_class: type, config: dict, key: str) -> None:
    with pytest.raises(TypeError, match=f"has no key '{key}'"):
        spec_class.from_dict(config)


def test_specs_round_trip_through_json_values() -> None:
    spec = EvalJobSpec.from_dict({"root_dir": "r", "stages": [{"name": "fit", "trainer": {"max_epochs": 2}}]})
    assert spec.stages[0].trainer == {"max_epochs": 2} and spec.stages[0].actions == [["fit", None]]
    assert EvalJobSpec.from_dict(spec.to_dict()) == spec
    train = TrainJobSpec.from_dict({"batch_size": 4, "rank_overrides": {"1": {"model": {"num_blocks": 3}}}})
    assert train.for_rank("1").model == {"num_blocks": 3} and train.for_rank("0").model == {}


# a job that starts a child ignoring SIGTERM, prints both process ids, then hangs
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
HANG = f"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", {STUBBORN!r}])
print("pids", child.pid, flush=True)
{STUBBORN}
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_hung_job_and_what_it_started_are_killed_at_the_bound() -> None:
    start = time.monotonic()
    (ended,) = run_processes([[sys.executable, "-c", HANG]], [job_environment()], timeout=3)
    assert time.monotonic() - start < 10
    assert ended.timed_out and ended.returncode is None and ended.seconds == 3, ended
    child = int(ended.output.split("pids")[1].split()[0])
    deadline = time.monotonic() + 5  # SIGKILL is sent at the bound; the process ends a moment later
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), f"process {child} started by the job outlived the bound"
    with pytest.raises(pytest.fail.Exception, match="did not finish within 1 s"):
        run_python(["-c", HANG], timeout=1)


def test_a_job_has_ended_when_what_it_started_has_ended() -> None:
    """As when rank 0 of a Lightning job exits before the ranks it started have written their results."""
    late = "import time; time.sleep(1); print('late')"
    early = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {late!r}])"
    (ended,) = run_processes([[sys.executable, "-c", early]], [job_environment()], timeout=30)
    assert not ended.timed_out and ended.returncode == 0 and "late" in ended.output, ended
