"""Faults on real processes: non-finite losses and gradients, a rank killed mid-step, a rank killed while saving.

Each rank is started by the test (as torchrun does), so every rank's exit code, exit time and output is checked.
Numbers are compared with one uninterrupted process (float64), in-process.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from fault_job import run
from launch import launch_ranks

from lightning_bfpp.run.nonfinite import NonFiniteCheck

TESTS = Path(__file__).resolve().parent
JOB = TESTS / "fault_job.py"
BASE = {"model": {"num_blocks": 2}, "batch_size": 4, "max_steps": 4, "pg_timeout": 20}
P2D2 = {**BASE, "devices": 4, "strategy": {"pipeline_parallel_size": 2, "micro_batches": 2}}
P2 = {**BASE, "devices": 2, "strategy": {"pipeline_parallel_size": 2, "micro_batches": 2}}


def reference(replicas: int = 1, max_steps: int = BASE["max_steps"], **faults: Any) -> dict[str, Any]:
    """One uninterrupted process on the same global batches (``batch_size * D``)."""
    config = {**BASE, "batch_size": BASE["batch_size"] * replicas, "max_steps": max_steps, "strategy": None}
    return run({**config, "faults": faults})


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
def test_nonfinite_check_names_what_it_found() -> None:
    """In-process (no process group): the losses of an accumulation window and the gradients are checked together."""
    check = NonFiniteCheck(rank=3, device=torch.device("cpu"))
    finite = [("a.weight", torch.ones(2, 2)), ("b.bias", torch.zeros(2))]
    check.add_losses(0, [torch.tensor(1.0), torch.tensor(2.0)])
    assert check.check(finite) == []
    check.add_losses(4, [torch.tensor(1.0), torch.tensor(float("nan"))])
    check.add_losses(5, [torch.tensor(1.0), torch.tensor(1.0)])
    assert check.check(finite) == ["the loss of micro-batch 1 of batch 4 on global rank 3 is nan"]
    assert check.check(finite) == []  # the window's losses are forgotten after a check
    found = check.check([*finite, ("c.weight", torch.tensor([1.0, float("-inf")]))])
    assert found == ["the gradients of c.weight on global rank 3"]


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


def test_killed_ranks_end_the_others_fast_and_the_job_resumes_exactly(tmp_path: Path) -> None:
    """P = 2 with a checkpoint (last.ckpt) after every step, in three runs:

    1. rank 1 is SIGKILLed inside its second checkpoint write (step 2's last.ckpt, replacing step 1's): rank 0 ends
       within seconds; last.ckpt is still the complete checkpoint of step 1 and the partial write is not picked;
    2. resumed from last, rank 0 is SIGKILLed in the middle of step 3's forward: rank 1, waiting for its activations,
       ends within seconds naming global rank 0;
    3. resumed from last (step 3), it trains to the end: the losses of the resumed steps and the final parameters are
       those of one uninterrupted process.
    """
    checkpoints = tmp_path / "checkpoints"
    config = {**P2, "max_steps": 5, "checkpoint_dir": str(checkpoints)}
    exits = start({**config, "faults": {"kill_rank": 1, "kill_save": 2}}, tmp_path / "killed-saving")
    assert_survivors_fail_fast(exits, killed=1)
    assert "during the save of the checkpoint" in exits[0].output, exits[0].output[-3000:]
    assert sorted(p.name for p in checkpoints.iterdir()) == [".last.ckpt.partial", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt" / "meta.pt", weights_only=False)["global_step"] == 1

    resumed = {**config, "ckpt_path": "last"}
    exits = start({**resumed, "faults": {"kill_rank": 0, "kill_step": 3}}, tmp_path / "killed-stepping")
    assert_survivors_fail_fast(exits, killed=0)
    assert "lost global rank 0 during the training step of global step 3" in exits[1].output, exits[1].output[-3000:]
    assert torch.load(checkpoints / "last.ckpt" / "meta.pt", weights_only=False)["global_step"] == 3

    exits = start(resumed, tmp_path / "resumed")
    assert all(e.returncode == 0 for e in exits), [e.output[-3000:] for e in exits if e.returncode != 0]
    state, results = merged(tmp_path / "resumed" / "out", 2)
    expected = reference(max_steps=5)
    assert_state_close(state, expected["state"])
    for result in results:
        assert sorted(result["losses"]) == [3, 4]
        for step, loss in result["losses"].items():
            assert loss == pytest.approx(expected["losses"][step], rel=1e-9, abs=1e-12), step


# ------------------------------------------------------------------------------------------- naming the lost rank
def test_a_failed_posting_and_a_barrier_inside_a_save_name_what_was_lost() -> None:
    """In-process (one gloo rank): a transfer that cannot even be posted names its peer, as a failed wait does; a
    rank lost in a barrier inside a save is reported as lost during the save."""
    import torch.distributed as dist

    from lightning_bfpp.run.faults import RankLostError, explain_lost_rank
    from lightning_bfpp.run.p2p import KIND_ACT, PeerLink

    class ClosedLink(PeerLink):
        def _start(self, ops: Any) -> Any:
            raise RuntimeError("[gloo] Connection closed by peer")

    timeout = timedelta(seconds=5)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        link = ClosedLink(dist.group.WORLD, 2, torch.device("cpu"))
        link.send([torch.ones(2)], KIND_ACT, stage=1, micro_batch=0, peer=0)
        expected = "lost global rank 0 during the training step of global step 3"
        with (
            pytest.raises(RankLostError, match=expected),
            explain_lost_rank("the training step of global step 3", 1, timeout),
        ):
            link.issue()
    finally:
        dist.destroy_process_group()

    def barrier() -> None:
        with explain_lost_rank("a barrier", 1, timeout):
            raise RuntimeError("[gloo] Connection closed by peer")

    expected = r"during the save of the checkpoint c \(a barrier\): \[gloo\]"
    with pytest.raises(RankLostError, match=expected), explain_lost_rank("the save of the checkpoint c", 1, timeout):
        barrier()
    with (
        pytest.raises(RankLostError, match="lost global rank 0 during a barrier"),
        explain_lost_rank("a barrier", 1, timeout, world_size=2),
    ):
        raise RuntimeError("[gloo] Connection reset by peer")  # a collective of two ranks: the other one is lost
