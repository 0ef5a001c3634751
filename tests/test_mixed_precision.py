"""Mixed precision: the pipelined forwards run under autocast and the backwards outside it, as Lightning's loop runs
them on one process; the training tracks the same module trained on one process with the same precision.

Pipelined and one-process mixed-precision runs are not bitwise equal (micro-batches change where the low-precision
products are rounded), so they are compared with a tolerance measured to lie well below what training without
autocast differs by.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fault_job import run as run_fault_job
from test_equivalence import reference
from test_faults import P2, merged, start


def relative_errors(result: Any, ref: dict[str, Any]) -> tuple[list[float], float]:
    """Per step, the largest relative difference of the logged loss on any rank from the one-process run; and the
    largest difference of a parameter entry, relative to that parameter's largest entry."""
    expected = torch.tensor(ref["logged"])
    loss_errors, param_error = torch.zeros_like(expected), 0.0
    for rank in result.ranks():
        loss_errors = torch.maximum(loss_errors, (torch.tensor(rank["logged"]) - expected).abs() / expected.abs())
        for name, value in rank["state"].items():
            reference_value = ref["state"][name].to(value.dtype)
            error = (value - reference_value).abs().max() / reference_value.abs().max()
            param_error = max(param_error, error.item())
    return loss_errors.tolist(), param_error


def relative_state_errors(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter, the largest difference of an entry relative to the parameter's largest entry."""
    return {name: ((state[name] - value).abs().max() / value.abs().max()).item() for name, value in expected.items()}


@pytest.mark.parametrize(
    ("sharding", "weight_gradients", "checkpointing", "replicas"),
    [("full", "per_micro_batch", "none", 2), ("none", "batched", "layer", 1)],
    ids=["zero3-D2", "batched-weight-gradients-recompute"],
)
def test_bf16_mixed_forwards_under_autocast_backwards_outside(
    run_job, sharding: str, weight_gradients: str, checkpointing: str, replicas: int
) -> None:
    """Every nn.Linear computes in bfloat16 and no backward runs under autocast, as on one process; the first step's
    loss equals the one-process bf16-mixed run's, later losses and the parameters after 3 Adam steps stay within a
    tolerance that the pipeline without autocast exceeds. ZeRO-3 gathers the parameters in bfloat16 and
    reduce-scatters the gradients in float32; batched weight gradients compute in bfloat16 like autograd's, and layers
    recomputed in the backward (activation checkpointing) run under the autocast of their forward."""
    config = {
        "devices": 2 * replicas,
        "strategy": {
            "pipeline_parallel_size": 2,
            "stages_per_rank": 2,
            "micro_batches": 4,
            "sharding": sharding,
            "weight_gradients": weight_gradients,
            "activation_checkpointing": checkpointing,
        },
        "model": {"num_blocks": 4, "optimizer": "adam"},
        "batch_size": 8,
        "max_steps": 3,
        "precision": "bf16-mixed",
        "record_autocast": True,
        "count_collectives": sharding == "full",
    }
    result = run_job(config, timeout=240)
    ref = reference({**config, "count_collectives": False}, replicas)
    assert ref["linear_dtypes"] == {"torch.bfloat16"} and ref["backward_autocast"] == {False}  # Lightning's loop
    for rank in result.ranks():
        assert rank["linear_dtypes"] == ref["linear_dtypes"], rank["rank"]
        assert rank["backward_autocast"] == ref["backward_autocast"], rank["rank"]
        if weight_gradients == "batched":
            assert rank["batched_linears"] > 0
        if sharding == "full":  # FSDP's mixed precision: gathered in the compute dtype, reduced in float32
            sent = {kind_dtype: n for kind_dtype, n in rank["collective_dtypes"].items() if n}
            assert set(sent) == {("all_gather", "torch.bfloat16"), ("reduce_scatter", "torch.float32")}, sent
    loss_errors, param_error = relative_errors(result, ref)
    # the first step's forward computes the same rows with the same bfloat16 products as one process; later steps
    # differ by where the gradient products are rounded (per micro-batch). Measured with autocast: 0 at the first
    # step, <= 1.0e-3 later, parameters <= 1.6e-3; without autocast: 2.6e-3 at the first step, parameters 7e-2.
    errors = f"loss errors per step {loss_errors}, parameter error {param_error:.2e}"
    assert loss_errors[0] < 1e-5 and max(loss_errors) < 2e-3 and param_error < 5e-3, errors


def test_fp16_mixed_shares_one_loss_scale_and_skips_overflows_on_every_rank(tmp_path: Path) -> None:
    """16-mixed with a CPU gradient scaler, P = 2, clipping by norm: an inf in a gradient on rank 0 only (first stage)
    at step 1 makes both ranks skip that step and halve the scale (the default nonfinite_loss="raise" does not raise
    for an overflow); the scale grows after every 2 good steps; clipping sees the unscaled gradients. Scales, losses
    and parameters are those of Lightning's own 16-mixed on one process."""
    config = {
        **P2,
        "precision": "16-mixed",
        "scaler": {"init_scale": 2.0**10, "growth_interval": 2},
        "clip_val": 0.5,
        "faults": {"grad_inf_step": 1},
    }
    exits = start(config, tmp_path)
    for rank, ended in enumerate(exits):
        assert ended.returncode == 0, f"rank {rank} exit {ended.returncode}:\n{ended.output[-3000:]}"
    state, results = merged(tmp_path / "out", 2)
    expected = run_fault_job({**config, "devices": 1, "strategy": None})
    assert expected["scales"] == {0: 1024.0, 1: 512.0, 2: 512.0, 3: 1024.0}  # the overflow is injected on one process
    for result in results:
        assert result["scales"] == expected["scales"], result["rank"]
        assert result["skipped"] == 0  # overflows are the scaler's business, not counted as non-finite skips
        losses = torch.tensor([result["losses"][step] for step in sorted(expected["losses"])])
        torch.testing.assert_close(losses, torch.tensor(list(expected["losses"].values())), rtol=1e-3, atol=0)
    errors = relative_state_errors(state, expected["state"])  # measured: <= 5e-5
    assert max(errors.values()) < 1e-3, errors
    unclipped = run_fault_job({**config, "devices": 1, "strategy": None, "clip_val": None})
    assert max(relative_state_errors(unclipped["state"], expected["state"]).values()) > 0.1  # clipping changes the run
