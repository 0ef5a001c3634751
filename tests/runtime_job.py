"""One rank of tests/test_runtime.py: trains a layer stack with :class:`StagePipeline` in a plain torch loop, without
Lightning, on two layouts in turn; rank 0 also trains the unsplit model on the whole batch as the reference.

Run by ``launch_ranks`` as ``runtime_job.py config.json``; writes ``rank<r>.pt`` into the config's ``out_dir``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from job_spec import RuntimeJobSpec
from torch import Tensor, nn

from lightning_bfpp.options import PipelineOptions
from lightning_bfpp.run.groups import PipelineGroups
from lightning_bfpp.run.microbatch import split_batch
from lightning_bfpp.run.pipeline import StagePipeline


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.tanh(self.linear(x))


class LayerStack(nn.Module):
    """An input projection, ``num_blocks`` residual blocks and an output projection, with the pipeline hooks."""

    def __init__(self, in_features: int = 4, width: int = 8, num_blocks: int = 4) -> None:
        super().__init__()
        self.first = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(num_blocks))
        self.head = nn.Linear(width, 1)

    def pipeline_layers(self) -> list[nn.Module]:
        return [self.first, *self.blocks, self.head]

    def pipeline_input(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["x"]

    def pipeline_layer_forward(self, index: int, layer: nn.Module, inputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return layer(inputs)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.pipeline_layers():
            x = layer(x)
        return x


def loss_of(outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
    return F.mse_loss(outputs.squeeze(-1), batch["y"])


def new_model() -> LayerStack:
    torch.manual_seed(0)  # the same weights on every rank and in the reference
    return LayerStack()


def new_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def batches(steps: int, size: int) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        {"x": torch.randn(size, 4, generator=generator), "y": torch.randn(size, generator=generator)}
        for _ in range(steps)
    ]


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """This rank's parameters by name, whole (a sharded one gathered)."""
    state = {}
    for name, p in model.named_parameters():
        state[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return state


def train_reference(data: list[dict[str, Tensor]]) -> dict[str, Any]:
    """The unsplit model, the whole batch at once, on this process."""
    model = new_model()
    optimizer = new_optimizer(model.parameters())
    losses = []
    for batch in data:
        optimizer.zero_grad()
        loss = loss_of(model(batch["x"]), batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "state": full_state(model)}


def train_pipelined(options: PipelineOptions, data: list[dict[str, Tensor]], timeout: timedelta) -> dict[str, Any]:
    """``StagePipeline`` in a plain torch loop; each replica takes its contiguous share of every batch."""
    groups = PipelineGroups.create(options.pipeline_parallel_size, timeout)  # type: ignore[arg-type]
    model = new_model()
    pipeline = StagePipeline.build(options, model, groups, torch.device("cpu"))
    optimizer = pipeline.shard_optimizer(new_optimizer(model.parameters()))
    M, losses = pipeline.micro_batches, []
    for batch in data:
        local = split_batch(batch, groups.data_parallel_size)[groups.data_parallel_rank]
        micro_batches = split_batch(local, M)
        optimizer.zero_grad()
        step_losses = pipeline.run(micro_batches, lambda m, out, mbs=micro_batches: loss_of(out, mbs[m]), 1 / M)
        pipeline.finish_step()
        optimizer.step()
        losses.append(torch.stack(step_losses).mean().item() if step_losses else None)
    result = {"losses": losses, "state": full_state(model), "pipeline_rank": groups.pipeline_rank}
    pipeline.close()
    return result


def main(config_path: str) -> None:
    spec = RuntimeJobSpec.from_dict(json.loads(Path(config_path).read_text()))
    torch.set_default_dtype(torch.float64)
    rank, world = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(seconds=spec.pg_timeout)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    data = batches(spec.steps, spec.batch_size)
    result: dict[str, Any] = {}
    for name, options in spec.layouts.items():
        result[name] = train_pipelined(PipelineOptions(**options), data, timeout)
    if rank == 0:
        result["reference"] = train_reference(data)
    result["lightning_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "torchmetrics"))
    if rank == 0:  # importing Lightning after lightning_bfpp registers the strategy
        from lightning.pytorch.strategies import StrategyRegistry

        result["registered"] = type(StrategyRegistry.get("bfpp")).__name__
    torch.save(result, Path(spec.out_dir) / f"rank{rank}.pt")
    gc.collect()  # the pipelines' process groups, before the default group ends
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
