"""Breadth-first pipeline parallelism for PyTorch Lightning.

``import lightning_bfpp`` registers ``Trainer(strategy="bfpp")``.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_bfpp.lightning.module import PipelineModule
from lightning_bfpp.lightning.strategy import BFPPStrategy

if BFPPStrategy.strategy_name not in StrategyRegistry:
    BFPPStrategy.register_strategies(StrategyRegistry)

__all__ = ["BFPPStrategy", "PipelineModule"]
__version__ = "0.1.0"
