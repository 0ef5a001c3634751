"""Breadth-first pipeline parallelism for PyTorch Lightning.

``import lightning_bfpp`` registers ``Trainer(strategy="bfpp")``. It imports Lightning only when Lightning is used:
the runtime (:mod:`lightning_bfpp.run`) trains without it. The strategy is registered at once if Lightning is already
imported, else as soon as ``lightning.pytorch`` finishes importing.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from typing import Any

__all__ = ["BFPPStrategy", "PipelineModule"]
__version__ = "0.1.0"

_LIGHTNING = "lightning.pytorch"


def _new_strategy(**kwargs: Any) -> Any:
    from lightning_bfpp.lightning.strategy import BFPPStrategy

    return BFPPStrategy(**kwargs)


def _register() -> None:
    """Registers ``"bfpp"`` with a factory: the strategy module is imported when a Trainer asks for it (importing it
    here, in the middle of an import of Lightning or of this package, could be circular)."""
    from lightning.pytorch.strategies import StrategyRegistry

    if "bfpp" not in StrategyRegistry:
        description = "Breadth-first pipeline parallelism with data-parallel replicas"
        StrategyRegistry.register("bfpp", _new_strategy, description=description)


class _RegisterWhenLightningLoads(MetaPathFinder):
    """Finds nothing itself: when ``lightning.pytorch`` is first imported, registers the strategy right after."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> ModuleSpec | None:
        if name != _LIGHTNING:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader, exec_module = spec.loader, spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _register()

        loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if _LIGHTNING in sys.modules:
    _register()
elif not any(isinstance(finder, _RegisterWhenLightningLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenLightningLoads())


def __getattr__(name: str) -> Any:
    """``BFPPStrategy`` and ``PipelineModule``, imported (with Lightning) on first use."""
    if name == "BFPPStrategy":
        from lightning_bfpp.lightning.strategy import BFPPStrategy

        return BFPPStrategy
    if name == "PipelineModule":
        from lightning_bfpp.lightning.module import PipelineModule

        return PipelineModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
