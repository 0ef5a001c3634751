"""A real multi-node launch: ``examples/slurm/train.sbatch`` on a local SLURM cluster of two emulated nodes.

``.ci/slurm_cluster.sh`` installs Debian's slurmctld, slurmd, slurm-client and munge if they are missing (apt-get, as
root) and starts munged, one slurmctld and two slurmd (nodes ``n1`` and ``n2``) on this machine; a cluster it started
that is still up is reused (and then left up), one this test started is stopped at the end. The job runs the main
example on CPU, 2 nodes x 2 tasks (``P = 2`` pipeline ranks x ``L = 2`` looped stages, ``D = 2`` replicas, float64);
srun starts the 4 processes and Lightning takes their ranks from SLURM. Its per-step losses (the CSV logger's
``metrics.csv``) must equal those of the same config on one process (``strategy=single``, the same global batch) to
1e-9. Never skipped: if the cluster cannot be installed or started the test fails, saying why.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_script

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / ".ci" / "slurm_cluster.sh"
SBATCH = ROOT / "examples" / "slurm" / "train.sbatch"
TRAIN = ROOT / "examples" / "train.py"
STATE = Path(os.environ.get("BFPP_SLURM_DIR", "/tmp/lightning-bfpp-slurm"))
SLURM_CONF = STATE / "slurm.conf"

NODES, TASKS_PER_NODE, BATCH_PER_REPLICA = 2, 2, 8
PIPELINE = 2  # P; D = NODES * TASKS_PER_NODE / P = 2 replicas
STEPS = 4
JOB_TIMEOUT = 180  # seconds from submission to the job's end
TINY = [
    "model.n_layer=2",  # 4 pipeline layers: P = 2 ranks x L = 2 looped stages of one layer
    "model.n_embd=32",
    "model.n_head=2",
    "data.seq_len=32",
    "data.max_tokens=200000",
    f"trainer.max_steps={STEPS}",
    "trainer.log_every_n_steps=1",  # every step's loss in metrics.csv
    "trainer.limit_val_batches=0",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_model_summary=false",
    "trainer.accelerator=cpu",
    "trainer.precision=64-true",
    f"checkpoint.every_n_train_steps={STEPS}",
    "log_interval=1",
]


def _cluster(command: str, timeout: float) -> subprocess.CompletedProcess:
    """Runs ``.ci/slurm_cluster.sh <command>``; the daemons it starts detach, so nothing keeps the pipes open."""
    try:
        return subprocess.run(
            ["bash", str(CLUSTER), command],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f".ci/slurm_cluster.sh {command} did not finish within {timeout:.0f} s:\n{error.output}")


def _slurm(*args: str, timeout: float = 20) -> str:
    env = dict(os.environ, SLURM_CONF=str(SLURM_CONF), PATH=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result.stdout


def _cluster_logs() -> str:
    return _cluster("logs", 30).stdout


@pytest.fixture(scope="module")
def slurm_cluster():
    """The local cluster: reused if ``.ci/slurm_cluster.sh`` already runs one, else started here and stopped after."""
    was_up = _cluster("status", 30).returncode == 0
    started = _cluster("start", 900)  # may apt-get install the packages first
    if started.returncode != 0:
        pytest.fail(
            "Could not install or start the local SLURM cluster (.ci/slurm_cluster.sh start); this test needs root "
            "and Debian's slurmctld, slurmd, slurm-client and munge (apt-get install slurmctld slurmd slurm-client "
            f"munge):\n{started.stdout}{started.stderr}\n{_cluster_logs()}"
        )
    yield
    if not was_up:
        stopped = _cluster("stop", 120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def _job_env(**extra: str) -> dict[str, str]:
    """The submitting environment (sbatch exports it to the job): this interpreter first on PATH, no SLURM/launcher
    variables of an enclosing job or test."""
    drop = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "PL_")
    launcher = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in launcher}
    path = f"{Path(sys.executable).parent}:{env.get('PATH', '')}:/usr/sbin:/sbin"
    env.update(SLURM_CONF=str(SLURM_CONF), PATH=path, PYTHONUNBUFFERED="1", RUN_NAME="slurm-ci", **extra)
    return env


def _job_state(job_id: str) -> tuple[str, str, str]:
    """(JobState, ExitCode, NodeList) from ``scontrol show job`` (the record stays MinJobAge = 600 s)."""
    text = _slurm("scontrol", "show", "job", job_id)
    fields = dict(re.findall(r"(\w+)=(\S*)", text))
    return fields.get("JobState", "?"), fields.get("ExitCode", "?"), fields.get("NodeList", "?")


def _losses(metrics_csv: Path) -> dict[int, float]:
    with metrics_csv.open() as f:
        return {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(f) if row.get("train_loss")}


def test_sbatch_on_two_nodes_matches_one_process(slurm_cluster, tmp_path: Path) -> None:
    run_dir, output = tmp_path / "slurm_run", tmp_path / "slurm-%j.out"
    submit = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--nodes={NODES}",
            f"--ntasks-per-node={TASKS_PER_NODE}",
            "--gpus-per-node=0",  # the script's default asks for 8 GPUs per node
            "--cpus-per-task=1",
            "--time=10",
            "--no-requeue",
            f"--output={output}",
            str(SBATCH),
            *TINY,
            f"strategy.pipeline_parallel_size={PIPELINE}",
            f"data.batch_size={BATCH_PER_REPLICA}",
            "strategy.timeout=60",  # a broken collective fails the job instead of waiting 30 minutes
        ],
        cwd=ROOT,  # SLURM_SUBMIT_DIR: the script runs examples/train.py from there
        env=_job_env(RUN_DIR=str(run_dir)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submit.returncode == 0, f"sbatch failed: {submit.stdout}{submit.stderr}\n{_cluster_logs()}"
    job_id = submit.stdout.strip().split(";")[0]
    output = tmp_path / f"slurm-{job_id}.out"

    def failure(message: str) -> str:
        job_output = output.read_text()[-8000:] if output.exists() else "(no job output)"
        rank_logs = "".join(f"\n===== {p}\n{p.read_text()[-2000:]}" for p in sorted(run_dir.glob("rank*.log")))
        return f"{message}\n===== job output {output}\n{job_output}{rank_logs}\n{_cluster_logs()}"

    # wait for the job to end, with a bound; cancel it if it does not
    start, state, error = time.monotonic(), ("?", "?", "?"), ""
    while time.monotonic() - start < JOB_TIMEOUT:
        try:
            state, error = _job_state(job_id), ""
        except (RuntimeError, subprocess.TimeoutExpired) as e:  # e.g. slurmctld busy: ask again until the bound
            error = str(e)
        if state[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job_id], env=_job_env(), timeout=20, capture_output=True)
        pytest.fail(failure(f"job {job_id} did not end within {JOB_TIMEOUT} s (state {state[0]}; cancelled) {error}"))
    job_state, exit_code, node_list = state
    assert job_state == "COMPLETED" and exit_code == "0:0", failure(f"job {job_id}: {job_state}, exit code {exit_code}")
    text = output.read_text()

    # srun started the 4 processes on both nodes and Lightning took their ranks from SLURM (it spawned none)
    assert node_list == "n[1-2]", failure(f"job ran on {node_list}")
    assert f"{NODES} nodes x {TASKS_PER_NODE} tasks, run directory {run_dir}" in text, failure("no job header")
    world = NODES * TASKS_PER_NODE
    assert f"{world} processes on {NODES} node(s), cluster environment SLURMEnvironment" in text, failure("not SLURM")
    for rank in range(world):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/{world}" in text, failure(f"rank {rank} did not start")
        assert (run_dir / f"rank{rank}.log").exists(), failure(f"no log of SLURM task {rank}")
    assert not list(run_dir.glob("train_ddp_process_*.log")), failure("Lightning spawned processes itself")
    assert "pipeline_parallel_size=2, stages_per_rank=2" in text and "precision 64-true" in text, failure("layout")
    assert (run_dir / "checkpoints" / "last.ckpt").exists(), failure("no checkpoint")

    # the same config on one process, the same global batch (D x the per-replica batch)
    reference_dir = tmp_path / "single"
    code, reference_output = run_script(
        TRAIN,
        [
            *TINY,
            "trainer=cpu",
            "strategy=single",
            f"data.batch_size={BATCH_PER_REPLICA * world // PIPELINE}",
            f"hydra.run.dir={reference_dir}",
        ],
        timeout=120,
        cwd=ROOT,
    )
    assert code == 0, reference_output[-4000:]

    losses = _losses(run_dir / "logs" / "version_0" / "metrics.csv")
    expected = _losses(reference_dir / "logs" / "version_0" / "metrics.csv")
    assert sorted(expected) == list(range(STEPS)), expected
    assert sorted(losses) == sorted(expected), failure(f"steps logged: {sorted(losses)}")
    for step, loss in expected.items():
        assert abs(losses[step] - loss) <= 1e-9, f"step {step}: {losses[step]!r} (SLURM) != {loss!r} (one process)"


def test_cluster_script_stop_is_safe_without_a_cluster(tmp_path: Path) -> None:
    """``stop`` with a state directory of no cluster touches nothing and succeeds."""
    env = dict(os.environ, BFPP_SLURM_DIR=str(tmp_path / "none"))
    result = subprocess.run(
        ["bash", str(CLUSTER), "stop"], capture_output=True, text=True, timeout=60, env=env, start_new_session=True
    )
    assert result.returncode == 0 and "nothing of ours was running" in result.stdout, result.stdout + result.stderr
