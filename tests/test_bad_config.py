"""Bad configurations end every rank quickly with a message that says what to change."""

from __future__ import annotations

import pytest

BASE = {
    "devices": 2,
    "strategy": {"pipeline_parallel_size": 2, "stages_per_rank": 1, "micro_batches": 2},
    "model": {"num_blocks": 2},
    "batch_size": 4,
    "max_steps": 1,
    "pg_timeout": 30,
}

CASES = [
    pytest.param({"devices": 3}, "is not divisible by pipeline_parallel_size=2", id="world-not-divisible"),
    pytest.param({"strategy": {"stages_per_rank": 3}}, "but the module has only 4 layers", id="too-many-stages"),
    pytest.param({"strategy": {"micro_batches": 0}}, "micro_batches must be an integer >= 1", id="no-micro-batches"),
    pytest.param({"batch_size": 3}, "does not split into micro_batches=2", id="batch-not-divisible"),
    pytest.param({"batch_size": 1}, "does not split into micro_batches=2", id="batch-smaller-than-M"),
    pytest.param({"model_class": "NoHooksModel"}, "lacks the pipeline hooks", id="missing-hooks"),
    pytest.param({"model_class": "ManualOptimizationModel"}, "needs automatic optimization", id="manual-optimization"),
    pytest.param(
        {"strategy": {"schedule": "depth_first", "stages_per_rank": 2, "micro_batches": 3}, "batch_size": 3},
        "multiple",
        id="depth-first-M-not-multiple-of-P",
    ),
    pytest.param(
        {"strategy": {"partition": "explicit", "partition_boundaries": [0, 2, 3]}},
        "strictly increasing layer indices from 0 to 4",
        id="explicit-partition-not-covering",
    ),
    pytest.param({"strategy": {"schedule": "zigzag"}}, "schedule='zigzag' is not supported", id="unknown-schedule"),
    pytest.param({"model_class": "VectorLossModel"}, "pipeline_loss must return a scalar tensor", id="vector-loss"),
    pytest.param({"model_class": "DictOutputModel"}, "must return a tensor or a tuple of tensors", id="dict-output"),
    pytest.param({"precision": "16-true"}, "precision='16-true' is not supported", id="unsupported-precision"),
    pytest.param(
        {"rank_overrides": {"1": {"strategy": {"micro_batches": 4}}}}, "The ranks disagree", id="ranks-disagree-on-M"
    ),
    pytest.param(
        {"rank_overrides": {"1": {"model": {"num_blocks": 3}}}}, "The ranks disagree", id="layer-count-differs"
    ),
]


def merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    return merged


@pytest.mark.parametrize(("override", "message"), CASES)
def test_bad_configuration_fails_with_a_clear_message(run_job, override: dict, message: str) -> None:
    result = run_job(merge(BASE, override), timeout=90, expect_success=False)
    assert result.returncode != 0
    assert message in result.output, result.output[-3000:]
