"""A structured config (dataclass) for :class:`~lightning_bfpp.BFPPStrategy`, for Hydra / OmegaConf apps.

Store it in Hydra's ConfigStore and instantiate it::

    from hydra.core.config_store import ConfigStore
    from hydra.utils import instantiate
    from lightning_bfpp.config import BFPPStrategyConfig

    ConfigStore.instance().store(group="strategy", name="bfpp", node=BFPPStrategyConfig)
    ...
    trainer = Trainer(strategy=instantiate(cfg.strategy, _convert_="all"), ...)

OmegaConf then rejects unknown keys, values of the wrong type and a choice that is not one (listing the choices)
when the config is composed; the options' own checks run when the strategy is instantiated. The config is made from
the fields of :class:`~lightning_bfpp.options.PipelineOptions` when this module is imported, in types OmegaConf
holds: a ``timedelta`` as seconds, tuples as lists, a ``Literal`` of names as an ``Enum`` of those names (a ``str``
subclass, equal to its name), a value of several types as ``Any``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from datetime import timedelta
from enum import Enum
from typing import Any, Literal, Optional

from lightning_bfpp.options import PipelineOptions

_PLAIN = (int, float, str, bool)


def _choices(name: str, names: tuple[str, ...]) -> type[Enum]:
    """An ``Enum`` of ``names`` (each its own value) for the option ``name``, importable from this module."""
    title = "".join(part.title() for part in name.split("_")) + "Choice"
    choices = Enum(title, {n: n for n in names}, type=str, module=__name__, qualname=title)  # type: ignore[misc]
    globals()[title] = choices  # pickled configs (e.g. submitit's) find it by name
    return choices


def _config_type(annotation: Any, name: str = "") -> Any:
    """The type OmegaConf is given for the option ``name`` of type ``annotation``."""
    if annotation in _PLAIN:
        return annotation
    if annotation is timedelta:
        return float
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return _choices(name, args) if name and all(isinstance(a, str) for a in args) else Any
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1:
            return Optional[_config_type(kinds[0], name)]  # noqa: UP045 (OmegaConf needs typing's Optional)
        mapped = {_config_type(k) for k in kinds}  # timedelta | float: float
        return mapped.pop() if len(mapped) == 1 else Any
    if origin in (tuple, list, Sequence):
        elements = {a for a in args if a is not Ellipsis}
        return list[elements.pop()] if len(elements) == 1 and next(iter(elements)) in _PLAIN else list[Any]
    return Any


def _config_value(value: Any) -> Any:
    if isinstance(value, timedelta):
        return value.total_seconds()
    return list(value) if isinstance(value, tuple) else value


def _config_field(option: dataclasses.Field, annotation: Any) -> tuple[str, Any, dataclasses.Field]:
    value = _config_value(option.default)
    kind = _config_type(annotation, option.name)
    if isinstance(kind, type) and issubclass(kind, Enum):
        value = kind[value]
    if isinstance(value, list):
        default = dataclasses.field(default_factory=lambda: list(value))
    else:
        default = dataclasses.field(default=value)
    return option.name, kind, default


def _structured_config() -> type:
    hints = typing.get_type_hints(PipelineOptions)
    fields = [_config_field(f, hints[f.name]) for f in dataclasses.fields(PipelineOptions)]
    target = ("_target_", str, dataclasses.field(default="lightning_bfpp.BFPPStrategy"))
    config = dataclasses.make_dataclass("BFPPStrategyConfig", [target, *fields])
    config.__module__ = __name__
    config.__doc__ = "The options of :class:`~lightning_bfpp.BFPPStrategy` (:class:`PipelineOptions`) for Hydra."
    return config


BFPPStrategyConfig = _structured_config()
