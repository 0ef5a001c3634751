"""Factories that the strategy configs ``ddp`` and ``single`` instantiate (``bfpp`` names the strategy class)."""

from __future__ import annotations

from datetime import timedelta

from lightning.pytorch.strategies import DDPStrategy


def single_device() -> str:
    """Lightning's default strategy; with ``devices=1`` it runs the module on one device, unsplit."""
    return "auto"


def ddp(
    process_group_backend: str | None = None, find_unused_parameters: bool = False, timeout: float = 1800.0
) -> DDPStrategy:
    """Lightning's ``DDPStrategy`` (the timeout in seconds, as in the bfpp config)."""
    return DDPStrategy(
        process_group_backend=process_group_backend,
        find_unused_parameters=find_unused_parameters,
        timeout=timedelta(seconds=timeout),
    )
