"""Every read of a device value on the host, and every copy of host data to the device, in one place.

On a GPU, reading a device value on the host (``.item()``, ``.tolist()``, ``.cpu()``, ``float(t)``, ``if t:``)
blocks the host until the device has run everything queued before it, and so does a ``.to(device)`` of pageable host
memory. One such call in the middle of a step stops the host from queueing the step ahead of the device; with small
micro-batches the device then idles between kernels. The package therefore reads device values only through
:func:`host_values` (a source check in the test suite fails on any other read) and uploads host data only through
:func:`to_device` (pinned memory and an asynchronous copy on an accelerator). A steady-state training step reads once,
at its end (see ``docs`` "GPUs and NCCL"); :func:`host_reads` counts the reads of this process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_reads = 0


def host_values(tensor: Tensor) -> Any:
    """``tensor``'s values as Python numbers (``tensor.tolist()``): the one host read of the package. On an
    accelerator it waits for the device to finish the work queued before it."""
    global _reads
    _reads += 1
    return tensor.tolist()


def host_tensor(tensor: Tensor) -> Tensor:
    """A copy of ``tensor`` in host memory (``tensor.cpu()``), counted as a host read like :func:`host_values`."""
    global _reads
    if tensor.device.type == "cpu":
        return tensor
    _reads += 1
    return tensor.cpu()


def host_reads() -> int:
    """The host reads this process has made through :func:`host_values` and :func:`host_tensor` so far."""
    return _reads


def to_device(values: Tensor, device: torch.device) -> Tensor:
    """``values`` (host memory) on ``device`` without blocking the host: pinned memory and a non-blocking copy on an
    accelerator (the caching host allocator keeps the pinned buffer until the copy ran); itself on the CPU."""
    if device.type == "cpu":
        return values
    return values.pin_memory().to(device, non_blocking=True)


def host_values_together(*tensors: Tensor | None) -> list[list[Any] | None]:
    """The values of several device tensors (None: skipped) in one host read (:func:`host_values` of their float64
    concatenation), each as a list; ``[]`` reads nothing when every one is None."""
    present = [t.detach().reshape(-1) for t in tensors if t is not None]
    if not present:
        return [None for _ in tensors]
    flat = host_values(torch.cat([t.to(dtype=torch.float64, device=present[0].device) for t in present]))
    out: list[list[Any] | None] = []
    offset = 0
    for tensor in tensors:
        if tensor is None:
            out.append(None)
            continue
        size = tensor.numel()
        out.append(flat[offset : offset + size])
        offset += size
    return out


__all__ = ["host_reads", "host_tensor", "host_values", "host_values_together", "to_device"]
