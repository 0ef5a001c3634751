"""Counts, inside a test job, the reads of tensor values on the host made by the package's own code.

Every ``Tensor`` method that hands a value to the host (``item``, ``tolist``, ``cpu``, ``numpy``, ``float(t)``,
``int(t)``, ``bool(t)``) is wrapped; a call counts when the Python frame that made it is in the package. On a GPU
each one makes the host wait for the device. The package's one reading function (``run/host_sync.py``) is counted
apart from the rest of the package, which must make none.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

import lightning_bfpp

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
PACKAGE = str(Path(lightning_bfpp.__file__).resolve().parent)
HOST_SYNC = str(Path(PACKAGE) / "run" / "host_sync.py")


class HostReadProbe(pl.Callback):
    """Wraps the reading methods while installed; ``steps`` holds, after each training batch, the reads made since
    the previous one: ``{"host_sync": n, "elsewhere": n, "where": {"file:line": n}}``."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.steps: list[dict[str, Any]] = []
        self._last: Counter[str] = Counter()
        self._originals: dict[str, Any] = {}

    def install(self) -> None:
        for name in READS:
            original = getattr(torch.Tensor, name)
            self._originals[name] = original
            setattr(torch.Tensor, name, self._counting(original))

    def remove(self) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)

    def _counting(self, original: Any) -> Any:
        counts = self.counts

        def wrapper(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1)
            path = caller.f_code.co_filename
            if path.startswith(PACKAGE):
                if path == HOST_SYNC:
                    counts["host_sync"] += 1
                else:
                    counts[f"{Path(path).relative_to(PACKAGE)}:{caller.f_lineno}"] += 1
            return original(tensor, *args, **kwargs)

        return wrapper

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.counts - self._last
        self._last = Counter(self.counts)
        where = {k: v for k, v in step.items() if k != "host_sync"}
        self.steps.append({"host_sync": step["host_sync"], "elsewhere": sum(where.values()), "where": where})
