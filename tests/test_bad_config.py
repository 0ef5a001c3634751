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


def test_a_ragged_last_batch_is_refused_before_the_first_batch() -> None:
    """With ``drop_last=False`` the loader's length tells at set-up whether its last batch splits into ``M``."""
    from types import SimpleNamespace

    import torch
    from lightning.pytorch.trainer.states import RunningStage
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from lightning_bfpp import BFPPStrategy
    from lightning_bfpp.run.microbatch import check_loader_batches

    def loader(samples: int, batch_size: int = 8, **kwargs) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(samples, 2)), batch_size=batch_size, **kwargs)

    with pytest.raises(ValueError, match=r"last batch holds 5 samples \(21 per data-parallel replica, batch_size=8\)"):
        check_loader_batches(loader(21), 4)
    check_loader_batches(loader(20), 4)  # a last batch of 4 splits into 4
    check_loader_batches(loader(21, drop_last=True), 4)  # never run
    with pytest.raises(ValueError, match="does not split into micro_batches=3"):
        check_loader_batches(loader(24), 3)  # every batch: refused as when the first one arrives
    sampler = DistributedSampler(TensorDataset(torch.zeros(42, 2)), num_replicas=2, rank=0, shuffle=False)
    with pytest.raises(ValueError, match=r"5 samples \(21 per data-parallel replica"):
        check_loader_batches(loader(42, sampler=sampler), 4)  # per replica

    strategy = BFPPStrategy(pipeline_parallel_size=2, micro_batches=4)
    stage = SimpleNamespace(stage=RunningStage.TRAINING)
    strategy._lightning_module = SimpleNamespace(trainer=SimpleNamespace(state=stage))  # type: ignore[assignment]
    with pytest.raises(ValueError, match="pass drop_last=True to the DataLoader"):
        strategy.process_dataloader(loader(21))
    stage.stage = RunningStage.VALIDATING  # evaluation splits a smaller last batch into fewer micro-batches
    assert strategy.process_dataloader(loader(21)) is not None
