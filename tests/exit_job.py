"""A one-step two-rank fit that ends as scripts end: every rank's result gathered, a barrier, then the interpreter's
normal exit. Run one process per rank (as torchrun starts them: ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT`` set),
e.g. by :func:`launch.launch_ranks`; the config is ignored."""

from __future__ import annotations

import atexit
import os

import lightning.pytorch as pl
import torch
from models import StackModel, loader

from lightning_bfpp import BFPPStrategy


def require_groups_destroyed() -> None:
    """Runs after every later-registered exit hook (the strategy's among them): the process groups must be gone
    before the interpreter finalizes, or their worker threads may abort it; exit code 3 if not."""
    if torch.distributed.is_initialized():
        print("process groups still alive at interpreter exit", flush=True)
        os._exit(3)


def main() -> None:
    atexit.register(require_groups_destroyed)
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    world = int(os.environ["WORLD_SIZE"])
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=BFPPStrategy(pipeline_parallel_size=world, micro_batches=2, timeout=20),
        precision="64-true",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(StackModel(num_blocks=2), train_dataloaders=loader(4, size=8))
    results = [None] * world
    torch.distributed.all_gather_object(results, float(trainer.callback_metrics.get("train_loss", 0.0)))
    trainer.strategy.barrier()


if __name__ == "__main__":
    main()
