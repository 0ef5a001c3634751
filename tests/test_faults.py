"""Faults on real processes: non-finite losses and gradients, a rank killed mid-step, a rank killed while saving.

Each rank is started by the test (as torchrun does), so every rank's exit code, exit time and output is checked.
Numbers are compared with one uninterrupted process (float64), in-process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fault_job import run
from launch import launch_ranks

TESTS = Path(__file__).resolve().parent
JOB = TESTS / "fault_job.py"
BASE = {"model": {"num_blocks": 2}, "batch_size": 4, "max_steps": 4, "pg_timeout": 20}
P2D2 = {**BASE, "devices": 4, "strategy": {"pipeline_parallel_size": 2, "micro_batches": 2}}
P2 = {**BASE, "devices": 2, "strategy": {"pipeline_parallel_size": 2, "micro_batches": 2}}


def reference(**faults: Any) -> dict[str, Any]:
    """One process, the same global batches (``batch_size * D``)."""
    return run({**BASE, "batch_size": 8 if faults.pop("replicas", 1) == 2 else 4, "strategy": None, "faults": faults})


def merged(out_dir: Path, world: int) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Every rank's parameters under their global names (replicas must agree exactly), and the per-rank results."""
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
    state: dict[str, torch.Tensor] = {}
    for result in results:
        for name, value in result["state"].items():
            if name in state:
                assert torch.equal(state[name], value), f"replicas differ in {name}"
            state[name] = value
    return state, results


def assert_state_close(seen: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(seen) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(seen[name], value, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def start(config: dict[str, Any], work: Path, timeout: float = 120) -> list[Any]:
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    return launch_ranks(JOB, {**config, "out_dir": str(out)}, config["devices"], work, timeout)


# ------------------------------------------------------------------------------------------------ non-finite values
def test_nonfinite_gradient_raises_on_every_rank(tmp_path: Path) -> None:
    """An inf in one gradient on global rank 0 (first stage, replica 0): every rank raises, naming step and value."""
    exits = start({**P2D2, "faults": {"grad_inf_step": 1}}, tmp_path)
    for rank, ended in enumerate(exits):
        assert ended.returncode not in (0, None), f"rank {rank} exit {ended.returncode}:\n{ended.output[-3000:]}"
        assert "NonFiniteError: Non-finite values at global step 1" in ended.output, ended.output[-3000:]
        assert "the gradients of first.weight on global rank 0" in ended.output, ended.output[-3000:]
        assert ended.seconds < 100


def test_nonfinite_loss_skips_the_step_on_every_rank(tmp_path: Path) -> None:
    """A NaN in the input of one micro-batch of one replica at step 2: every rank skips that optimizer step; the
    parameters equal a one-process run that made no update at step 2."""
    config = {**P2D2, "strategy": {**P2D2["strategy"], "nonfinite_loss": "skip"}, "faults": {"nan_step": 2}}
    exits = start(config, tmp_path)
    for rank, ended in enumerate(exits):
        assert ended.returncode == 0, f"rank {rank} exit {ended.returncode}:\n{ended.output[-3000:]}"
    assert "Skipped the optimizer step at global step 2" in exits[0].output
    assert "the loss of micro-batch 0 of batch 2 on global rank" in exits[0].output
    state, results = merged(tmp_path / "out", 4)
    assert [r["skipped"] for r in results] == [1, 1, 1, 1]
    expected = reference(replicas=2, skip_steps=[2])
    assert_state_close(state, expected["state"])
    for result in results:  # every rank saw the same losses: the reference's, and NaN at the skipped step
        losses = result["losses"]
        assert sorted(losses) == [0, 1, 2, 3] and torch.isnan(torch.tensor(losses[2]))
        for step in (0, 1, 3):
            assert losses[step] == pytest.approx(expected["losses"][step], rel=1e-9, abs=1e-12)
    unskipped = reference(replicas=2)["state"]  # the check can fail: without the skip, the parameters differ
    assert any(not torch.allclose(unskipped[n], v) for n, v in expected["state"].items())


# -------------------------------------------------------------------------------------------------------- lost ranks
def assert_survivors_fail_fast(exits: list[Any], killed: int) -> None:
    """The killed rank ended by SIGKILL; every other rank ended non-zero within 60 s of it, naming what happened."""
    assert exits[killed].returncode == -9, exits[killed].output[-3000:]
    for rank, ended in enumerate(exits):
        if rank == killed:
            continue
        assert ended.returncode not in (0, None), f"rank {rank} exit {ended.returncode}:\n{ended.output[-3000:]}"
        assert ended.seconds - exits[killed].seconds < 60
        assert "RankLostError" in ended.output and "timeout of 20 s" in ended.output, ended.output[-3000:]


def resume_and_compare(config: dict[str, Any], work: Path, first_step: int) -> None:
    """Resumes from ``last`` with the same layout; the resumed steps and the final parameters are those of one
    uninterrupted process."""
    exits = start({**config, "ckpt_path": "last"}, work)
    assert all(e.returncode == 0 for e in exits), [e.output[-3000:] for e in exits if e.returncode != 0]
    state, results = merged(work / "out", config["devices"])
    expected = reference()
    assert_state_close(state, expected["state"])
    for result in results:
        assert sorted(result["losses"]) == list(range(first_step, BASE["max_steps"]))
        for step, loss in result["losses"].items():
            assert loss == pytest.approx(expected["losses"][step], rel=1e-9, abs=1e-12), step


def test_a_killed_rank_ends_the_others_and_the_job_resumes_exactly(tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed in the middle of step 2's forward; rank 0 (waiting for its activations or gradients) ends
    within seconds naming global rank 1; the job resumes from the checkpoint of step 2 and ends like one process."""
    config = {**P2, "checkpoint_dir": str(tmp_path / "checkpoints")}
    exits = start({**config, "faults": {"kill_rank": 1, "kill_step": 2}}, tmp_path / "killed")
    assert_survivors_fail_fast(exits, killed=1)
    assert "lost global rank 1 during the training step of global step 2" in exits[0].output, exits[0].output[-3000:]
    resume_and_compare(config, tmp_path / "resumed", first_step=2)


def test_a_rank_killed_while_saving_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed inside its second checkpoint write (last.ckpt of step 2, replacing that of step 1): the
    last checkpoint stays the complete one of step 1, the partial write is never picked, and resuming from it ends
    like one process."""
    checkpoints = tmp_path / "checkpoints"
    config = {**P2, "checkpoint_dir": str(checkpoints)}
    exits = start({**config, "faults": {"kill_rank": 1, "kill_save": 2}}, tmp_path / "killed")
    assert_survivors_fail_fast(exits, killed=1)
    assert "during the save of the checkpoint" in exits[0].output, exits[0].output[-3000:]
    assert sorted(p.name for p in checkpoints.iterdir()) == [".last.ckpt.partial", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt" / "meta.pt", weights_only=False)["global_step"] == 1
    resume_and_compare(config, tmp_path / "resumed", first_step=1)
