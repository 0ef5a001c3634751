"""Large models: layers built on the meta device and materialized only where they run.

A module whose layers are created on the meta device (``with torch.device("meta"): ...``, or under
``trainer.init_module(empty_init=True)`` with ``BFPPStrategy``) holds no memory until :func:`materialize_layers` gives
the layers storage on a device and initializes them, one layer at a time, with ``PipelineModule.pipeline_init_layer``
under a random seed derived from the run's seed and the layer index. Every layout, and one process, therefore gets the
same initial weights, while each pipeline rank allocates only the layers it holds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

SEED_STRIDE = 1_000_003  # layer seeds of one run are base * SEED_STRIDE + index: distinct for < 1e6 layers


def layer_seed(index: int, base: int | None = None) -> int:
    """The seed of layer ``index``'s initialization: from ``base`` (default: the seed given to Lightning's
    ``seed_everything``, 0 if none) and the index."""
    if base is None:
        base = int(os.environ.get("PL_GLOBAL_SEED", 0))
    return (base * SEED_STRIDE + index) % (2**63)


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers())


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Runs the block with the random state of ``device`` (and the CPU) seeded by ``seed``, restored after."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def _to_empty(layers: Sequence[nn.Module], device: torch.device) -> None:
    """Gives every meta parameter and buffer of ``layers`` (uninitialized) storage on ``device``, keeping a parameter
    shared by several modules shared (``Module.to_empty`` would make one copy per module)."""
    made: dict[int, torch.Tensor] = {}
    for layer in layers:
        for module in layer.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is None or not tensor.is_meta:
                        continue
                    if id(tensor) not in made:
                        empty = torch.empty_like(tensor, device=device)
                        is_param = isinstance(tensor, nn.Parameter)
                        made[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if is_param else empty
                    table[name] = made[id(tensor)]


@torch.no_grad()
def materialize_layers(module: nn.Module, layers: Sequence[tuple[int, nn.Module]], device: torch.device) -> None:
    """Materializes the meta layers among ``layers`` (``(layer index, layer)``) on ``device`` and initializes each with
    ``module.pipeline_init_layer(index, layer)`` under :func:`layer_seed` ``(index)``, in index order. A parameter
    shared with an earlier layer (a tied weight) keeps the earlier layer's values."""
    todo = sorted(((i, layer) for i, layer in layers if has_meta_tensors(layer)), key=lambda pair: pair[0])
    if not todo:
        return
    _to_empty([layer for _, layer in todo], device)
    done: set[int] = set()  # parameters initialized by an earlier layer
    for index, layer in todo:
        params = list(layer.parameters())
        keep = {id(p): p.detach().clone() for p in params if id(p) in done}
        with seeded(layer_seed(index), device):
            module.pipeline_init_layer(index, layer)  # type: ignore[operator]
        for p in params:
            if id(p) in keep:
                p.copy_(keep[id(p)])
        done.update(id(p) for p in params)


def check_materialized(module: nn.Module) -> None:
    """Raises if a parameter or buffer of ``module`` is still on the meta device."""
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(
            f"{left[:5]} are still on the meta device after the layers were materialized: only tensors inside "
            "pipeline_layers() are materialized; create the others on a real device."
        )
