"""A structured config (dataclass) for :class:`~lightning_bfpp.BFPPStrategy`, for Hydra / OmegaConf apps.

Store it in Hydra's ConfigStore and instantiate it::

    from hydra.core.config_store import ConfigStore
    from hydra.utils import instantiate
    from lightning_bfpp.config import BFPPStrategyConfig

    ConfigStore.instance().store(group="strategy", name="bfpp", node=BFPPStrategyConfig)
    ...
    trainer = Trainer(strategy=instantiate(cfg.strategy), ...)

OmegaConf then rejects unknown keys and values of the wrong type when the config is composed; the strategy's own
constructor checks the values (choices, sizes) when it is instantiated. The fields and defaults mirror the
constructor's arguments (a test checks that they stay in step).
"""

from dataclasses import dataclass, field
from typing import Any


@dataclass
class BFPPStrategyConfig:
    """The arguments of :class:`~lightning_bfpp.BFPPStrategy` (see its docstring for their meaning)."""

    _target_: str = "lightning_bfpp.BFPPStrategy"
    pipeline_parallel_size: Any = "auto"  # an int >= 1 or "auto"
    stages_per_rank: int = 1
    micro_batches: int | None = None
    schedule: str = "breadth_first"
    partition: str = "uniform"
    # a list of ints or None (`Any`: OmegaConf 2.3 cannot merge an interpolation onto an Optional[list] field)
    partition_boundaries: Any = None
    rank_layout: str = "dp_contiguous"
    sharding: str = "none"
    activation_checkpointing: str = "none"  # none | stage | layer
    breadth_first_micro_batches: int | None = None  # group size of memory-bounded breadth-first; None: all M
    weight_gradients: str = "per_micro_batch"  # per_micro_batch | batched
    process_group_backend: str | None = None
    timeout: float = 1800.0  # seconds
    nonfinite_loss: str = "raise"  # raise | skip
    timeline_dir: str | None = None
    timeline_batches: list[int] = field(default_factory=lambda: [2, 4])  # (first, stop)
