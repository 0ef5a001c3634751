"""What the app checks before any process starts: the config's keys, the hardware it asks for, the layout.

Each check raises :class:`ConfigError` with one line naming the key and what to change; Hydra prints it without a
traceback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from lightning_bfpp.plan.partition import build_partition
from lightning_bfpp.plan.schedule import build_schedule
from lightning_bfpp.run.microbatch import check_divisible


class ConfigError(CompactHydraException, ValueError):
    """A config key or value that cannot be used; the message names it (Hydra prints it without a traceback)."""


def check_config(cfg: DictConfig) -> None:
    """Fails with a message naming the key when a key is unknown (also one added with ``+key=value``), a mandatory
    value is missing (``???``) or a value cannot be resolved to its declared type."""
    unknown = list(_unknown_keys(cfg, ""))
    if unknown:
        key, schema, allowed = unknown[0]
        raise ConfigError(
            f"Unknown config key '{key}': {schema.__name__} has no field of that name; its fields are "
            f"{', '.join(sorted(allowed))}."
        )
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"Missing mandatory config value(s) {', '.join(missing)}: set them on the command line, "
            f"e.g. {missing[0]}=..."
        )
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # raises naming the key (full_key: ...)


def _unknown_keys(node: DictConfig, prefix: str) -> Iterator[tuple[str, type, set[str]]]:
    schema = OmegaConf.get_type(node)
    allowed = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node:
        if allowed is not None and key not in allowed:
            yield f"{prefix}{key}", schema, allowed  # type: ignore[misc]
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            yield from _unknown_keys(child, f"{prefix}{key}.")


def is_single(cfg: DictConfig) -> bool:
    """Whether ``cfg.strategy`` is ``strategy=single`` (one process, the unsplit model)."""
    return str(cfg.strategy.get("_target_", "")).endswith(".single_device")


def check_single_device(cfg: DictConfig) -> None:
    """Fails before any process starts when ``strategy=single`` (one process) is given several devices."""
    if is_single(cfg) and str(cfg.trainer.devices) not in ("auto", "1"):
        raise ConfigError(
            f"strategy=single runs one process, but trainer.devices={cfg.trainer.devices}: drop trainer.devices, or "
            "use strategy=bfpp or strategy=ddp for several processes."
        )


def on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda")


def check_hardware(trainer: DictConfig) -> None:
    """Refuses a GPU trainer where no GPU is visible, and device or node counts below one."""
    accelerator = str(trainer.accelerator)
    if on_gpu(accelerator) and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} (e.g. trainer=gpu or trainer=slurm), but no CUDA GPU is visible on "
            "this machine: use trainer=cpu, or trainer=auto (GPUs when there are any, else CPU processes)."
        )
    devices = trainer.devices
    if str(devices).strip() not in ("auto", "-1") and count_devices(devices, accelerator) < 1:
        raise ConfigError(
            f"trainer.devices={devices}: give a number of processes per node >= 1, a list of device indices, or auto."
        )
    if not isinstance(trainer.num_nodes, int) or trainer.num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes={trainer.num_nodes}: give a number of nodes >= 1.")


def count_devices(devices: Any, accelerator: str) -> int:
    """The number of processes per node that Lightning makes of ``trainer.devices`` (an int, a list or a string)."""
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1"):
        return torch.cuda.device_count() if on_gpu(accelerator) else 1
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"trainer.devices={devices!r}: give a number, a list of device indices, or auto.") from None


def check_pipeline(cfg: DictConfig, strategy: Any, model: Any, trainer_kwargs: dict[str, Any]) -> None:
    """Checks the pipeline layout against the model and the batch size before any process starts (the strategy
    checks again on every rank), so that a layout that cannot work fails once, with one message."""
    options = getattr(strategy, "options", None)
    if options is None or not hasattr(model, "pipeline_layers"):
        return
    world = count_devices(trainer_kwargs["devices"], trainer_kwargs["accelerator"]) * trainer_kwargs["num_nodes"]
    pipeline = world if options.pipeline_parallel_size == "auto" else options.pipeline_parallel_size
    micro_batches = options.micro_batches or pipeline
    if world % pipeline:
        raise ConfigError(
            f"strategy.pipeline_parallel_size={pipeline} does not divide the {world} processes (trainer.devices x "
            "trainer.num_nodes): change one of them."
        )
    batch_size = cfg.data.get("batch_size") if isinstance(cfg.data, DictConfig) else None
    if batch_size is not None:
        try:
            check_divisible(batch_size, micro_batches)
        except ValueError as error:
            raise ConfigError(f"data.batch_size={batch_size}: {error}") from error
    try:
        layers = list(model.pipeline_layers())
        build_partition(layers, pipeline, options.stages_per_rank, options.partition, options.partition_boundaries)
        groups = options.breadth_first_micro_batches  # M checked against its groups once M is known (P = "auto")
        build_schedule(
            options.schedule, pipeline, options.stages_per_rank, micro_batches, breadth_first_micro_batches=groups
        )
    except ValueError as error:
        raise ConfigError(f"The pipeline layout does not fit (strategy.*): {error}") from error
