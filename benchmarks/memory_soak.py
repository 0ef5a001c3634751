"""Long-run memory check: a tiny model trained for many steps on P = 2 x D = 2 CPU processes keeps its resident
memory flat after warm-up, and no activation, received buffer or output gradient of one step lives into the next.

    python benchmarks/memory_soak.py [--steps 500] [--warmup 100] [--limit 5]

Each rank reads its resident set size (``/proc/self/statm``) after ``--warmup`` steps and at the end, and keeps a
weak reference to every tensor that enters or leaves a pipeline layer (stage inputs received from the previous
rank, activations) and to every gradient that reaches a layer's output; at the start of each step it counts those of
the previous step that are still alive. Rank 0 prints every rank's figures; every rank exits with 1 if one rank grew
by ``--limit`` percent or more, or kept a tensor of an earlier step. ``--leak-kb N`` keeps N KiB per step alive on
purpose (to see the check fail). The last line is the headline figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import weakref
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_bfpp import BFPPStrategy, PipelineModule

WIDTH, LAYERS, BATCH = 32, 6, 8
_LEAK: list[Tensor] = []


def rss_bytes() -> int:
    """This process's resident set size."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak resident size is the best the standard library offers
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class SoakModel(PipelineModule):
    """``LAYERS`` residual tanh blocks between an input and an output projection; remembers its step's tensors."""

    def __init__(self, leak_kb: int = 0) -> None:
        super().__init__()
        self.leak_kb = leak_kb
        self.layers = nn.ModuleList(
            [nn.Linear(4, WIDTH), *[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)], nn.Linear(WIDTH, 1)]
        )
        self.step_refs: list[weakref.ref] = []

    def pipeline_layers(self) -> nn.ModuleList:
        return self.layers

    def pipeline_input(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["x"]

    def _remember(self, tensor: Tensor) -> None:
        self.step_refs.append(weakref.ref(tensor))
        if tensor.requires_grad:
            tensor.register_hook(lambda grad: self.step_refs.append(weakref.ref(grad)) or None)

    def pipeline_layer_forward(self, index: int, layer: nn.Module, inputs: Any, batch: Any) -> Any:
        if index > 0:  # the first layer's input is a slice of the batch, which the data loader may hold
            self._remember(inputs)
        out = layer(inputs)
        out = out if index in (0, len(self.layers) - 1) else inputs + torch.tanh(out)
        self._remember(out)
        return out

    def pipeline_loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return F.mse_loss(outputs.squeeze(-1), batch["y"])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.leak_kb:
            _LEAK.append(torch.ones(self.leak_kb * 256))  # float32: 4 bytes each

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class SoakMonitor(pl.Callback):
    """Resident memory after warm-up and at the end; tensors of a step still alive when the next one starts."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.rss_warm = self.rss_end = 0
        self.survivors = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.survivors += sum(ref() is not None for ref in pl_module.step_refs)
        pl_module.step_refs = []
        if trainer.global_step == self.warmup:
            self.rss_warm = rss_bytes()

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.survivors += sum(ref() is not None for ref in pl_module.step_refs)
        self.rss_end = rss_bytes()


def batches(steps: int, replicas: int, rank: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, BATCH * replicas, 4, generator=g)
    data = [{"x": x[k % 64], "y": torch.sin(x[k % 64].sum(-1))} for k in range(steps)]
    return DataLoader([{k: v[rank * BATCH : (rank + 1) * BATCH] for k, v in b.items()} for b in data], batch_size=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--limit", type=float, default=5.0, help="largest allowed RSS growth after warm-up, percent")
    parser.add_argument("--leak-kb", type=int, default=0, help="keep this many KiB alive per step (to see a failure)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    strategy = BFPPStrategy(pipeline_parallel_size=2, micro_batches=2, timeout=120)
    monitor = SoakMonitor(args.warmup)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=4,
        strategy=strategy,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    model = SoakModel(args.leak_kb)
    trainer.fit(model, train_dataloaders=batches(args.steps, 2, strategy.data_parallel_rank))
    figures = [None] * trainer.world_size
    dist.all_gather_object(figures, (monitor.rss_warm, monitor.rss_end, monitor.survivors))
    growth = [100.0 * (end - warm) / warm for warm, end, _ in figures]
    survivors = sum(s for _, _, s in figures)
    ok = max(growth) < args.limit and survivors == 0
    if trainer.global_rank == 0:
        measured = args.steps - args.warmup
        print(f"{'rank':>4} {'RSS after warm-up':>18} {'RSS at end':>11} {'growth':>7} {'tensors kept':>13}")
        for rank, ((warm, end, kept), grew) in enumerate(zip(figures, growth, strict=True)):
            print(f"{rank:>4} {warm / 2**20:>15.1f} MiB {end / 2**20:>7.1f} MiB {grew:>6.2f}% {kept:>13}")
        verdict = "ok" if ok else "FAILED"
        print(
            f"memory soak {verdict}: P=2 x D=2, {args.steps} steps, largest RSS growth over the last {measured} steps "
            f"{max(growth):.2f}% (limit {args.limit:g}%), {survivors} tensors outlived their step"
        )
    dist.barrier()
    dist.destroy_process_group()  # a clean exit: no gloo thread left to abort the process at interpreter exit
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
