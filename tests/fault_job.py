"""Trains a test model with injected faults, from a :class:`job_spec.FaultJobSpec` (read from JSON): one process per
rank, started by the test with ``LOCAL_RANK``/``WORLD_SIZE`` set (as torchrun does), or called in-process for the
one-process reference.

Its fields besides those it shares with ``run_job.py``'s spec:

- ``faults``: ``nan_step`` (a NaN in the input of the first micro-batch of replica 0 at that global step),
  ``grad_inf_step`` (an inf in the gradient of the first layer on the rank holding it, replica 0),
  ``skip_steps`` (reference runs: no optimizer step at those global steps), ``kill_rank`` with ``kill_step`` (the
  process SIGKILLs itself in the middle of that step's forward) or ``kill_save`` (inside its n-th checkpoint write),
  ``hang_rank`` with ``hang_step`` (the process sleeps for ever in that step's forward), ``signal_grace`` and
  ``end_grace`` (the strategy's, seconds), ``save_on_exception`` (a ``ModelCheckpoint(save_on_exception=True)`` in
  ``checkpoint_dir`` that saves nothing else), ``slurm`` (the ranks run as SLURM tasks of job 4242 with auto-requeue,
  ``scontrol`` writing its arguments to ``out_dir/scontrol.txt``; Lightning's checkpoints go to ``out_dir``).
- ``precision`` (default ``64-true``), ``scaler`` and ``clip_val`` as in ``run_job.py`` (``16-mixed`` on CPU).
- ``checkpoint_dir``: save ``last.ckpt`` there after every step; ``ckpt_path``: resume from it (``"last"`` too).

Each rank writes ``rank<r>.pt``: ``{global step: loss}`` as this rank saw it, its parameters, the skipped-step count,
``{global step: loss scale after it}`` with a gradient scaler; and prints ``finished global step <n>`` after each step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))

from job_spec import FaultJobSpec
from models import RegressionData, StackModel
from run_job import precision_arguments
from torch.utils.data import DataLoader

from lightning_bfpp import BFPPStrategy


class FaultModel(StackModel):
    """:class:`StackModel` that can put a NaN or inf where a test asks for one, or kill its own process."""

    def __init__(self, faults: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.faults = faults or {}

    def _is_replica_zero(self) -> bool:
        replicas = self.trainer.distributed_sampler_kwargs
        return replicas is None or replicas["rank"] == 0

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer.global_step == self.faults.get("nan_step") and self._is_replica_zero():
            batch = {**batch, "x": batch["x"].clone()}
            batch["x"][0, 0] = float("nan")  # the first sample: the first micro-batch of replica 0
        return batch

    def pipeline_layer_forward(self, index: int, layer: Any, inputs: Any, batch: Any) -> Any:
        f = self.faults
        if self.trainer.global_step == f.get("kill_step", -1) and self.trainer.global_rank == f.get("kill_rank"):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.trainer.global_step == f.get("hang_step", -1) and self.trainer.global_rank == f.get("hang_rank"):
            print(f"global rank {self.trainer.global_rank} hangs", flush=True)
            while True:
                time.sleep(1)
        return super().pipeline_layer_forward(index, layer, inputs, batch)

    def on_after_backward(self) -> None:
        weight = getattr(self.first, "weight", None)  # None on ranks that do not hold the first layer
        at_step = self.trainer.global_step == self.faults.get("grad_inf_step")
        if at_step and self._is_replica_zero() and weight is not None and weight.grad is not None:
            weight.grad[0, 0] = float("inf")

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if self.trainer.global_step in self.faults.get("skip_steps", ()):
            optimizer_closure()  # the reference for a skipped step: the batch runs, the parameters do not move
            optimizer.zero_grad()
            return
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)


class StepData(pl.LightningDataModule):
    """Global batch ``k`` is rows ``[k * B, (k + 1) * B)`` of the regression data (wrapping around), each replica
    taking its contiguous share. The loader starts at the trainer's global step, so a resumed run reads the batches
    the uninterrupted run would have read."""

    def __init__(self, batch_size: int, size: int = 96, steps: int = 64) -> None:
        super().__init__()
        self.batch_size, self.size, self.steps = batch_size, size, steps

    def train_dataloader(self) -> DataLoader:
        replicas = self.trainer.distributed_sampler_kwargs or {"num_replicas": 1, "rank": 0}
        data, rows = RegressionData(size=self.size), self.batch_size * replicas["num_replicas"]
        first, batches = self.trainer.global_step, []
        for k in range(first, first + self.steps):
            index = [(k * rows + replicas["rank"] * self.batch_size + i) % self.size for i in range(self.batch_size)]
            batches.append({"x": data.x[index], "y": data.y[index], "mask": data.mask[index]})
        return DataLoader(batches, batch_size=None)


class LossRecorder(pl.Callback):
    """``{global step: logged train_loss}`` of the batches this run trained."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.scales: dict[int, float] = {}  # the gradient scaler's scale after the step (16-mixed)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses[self._step] = float(trainer.callback_metrics["train_loss"])  # averaged over the replicas
        print(f"global rank {trainer.global_rank} finished global step {self._step}", flush=True)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.scales[self._step] = scaler.get_scale()


def _kill_inside_checkpoint_writes(rank: int, save_index: int) -> None:
    """SIGKILLs this process in its ``save_index``-th DCP write, after its own files are written."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    original, count = FileSystemWriter.write_data, [0]

    def write_data(self: Any, plan: Any, planner: Any) -> Any:
        count[0] += 1
        result = original(self, plan, planner)
        if count[0] == save_index and int(os.environ.get("LOCAL_RANK", "0")) == rank:
            result.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    FileSystemWriter.write_data = write_data  # type: ignore[method-assign]


def _run_as_slurm_tasks(spec: FaultJobSpec) -> None:
    """Sets what srun sets for task ``LOCAL_RANK`` of a one-node job 4242, and puts an ``scontrol`` on the PATH
    that writes its arguments to ``out_dir/scontrol.txt``."""
    rank, world = os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]
    os.environ.update(
        SLURM_NTASKS=world, SLURM_NTASKS_PER_NODE=world, SLURM_NNODES="1", SLURM_PROCID=rank, SLURM_LOCALID=rank,
        SLURM_NODEID="0", SLURM_JOB_NAME="fault_job", SLURM_JOB_ID="4242",
    )  # fmt: skip
    assert spec.out_dir is not None
    bin_dir = Path(spec.out_dir) / f"bin{rank}"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {Path(spec.out_dir) / "scontrol.txt"}\n')
    scontrol.chmod(0o755)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def run(config: FaultJobSpec | dict[str, Any]) -> dict[str, Any]:
    """Trains as ``config`` says (a spec, or a dict of its fields) on this rank; returns what this rank saw."""
    spec = FaultJobSpec.from_dict(config)
    pl.seed_everything(spec.seed, verbose=False)
    faults = spec.faults
    if "kill_save" in faults:
        _kill_inside_checkpoint_writes(faults["kill_rank"], faults["kill_save"])
    if faults.get("slurm"):
        _run_as_slurm_tasks(spec)
    model = FaultModel(faults=faults, **spec.model)
    strategy: Any = "auto"
    if spec.strategy is not None:
        strategy = BFPPStrategy(timeout=timedelta(seconds=spec.pg_timeout), **spec.strategy)
        for grace in ("signal_grace", "end_grace"):
            if grace in faults:
                setattr(strategy, grace, faults[grace])
    recorder = LossRecorder()
    callbacks: list[pl.Callback] = [recorder]
    if spec.checkpoint_dir and faults.get("save_on_exception"):
        callbacks.append(ModelCheckpoint(spec.checkpoint_dir, save_top_k=0, save_on_exception=True))
    elif spec.checkpoint_dir:
        callbacks.append(ModelCheckpoint(spec.checkpoint_dir, every_n_train_steps=1, save_top_k=0, save_last=True))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=spec.devices,
        strategy=strategy,
        **precision_arguments(spec.precision, spec.scaler),
        max_steps=spec.max_steps,
        gradient_clip_val=spec.clip_val,
        limit_val_batches=0,
        enable_checkpointing=bool(spec.checkpoint_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=callbacks,
        use_distributed_sampler=False,
        default_root_dir=spec.out_dir,
    )
    data = StepData(spec.batch_size, spec.data_size)
    trainer.fit(model, datamodule=data, ckpt_path=spec.ckpt_path)
    result = {
        "rank": trainer.global_rank,
        "losses": recorder.losses,
        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "skipped": getattr(trainer.strategy, "skipped_steps", None),
        "scales": recorder.scales,
    }
    if spec.out_dir:
        torch.save(result, Path(spec.out_dir) / f"rank{trainer.global_rank}.pt")
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started with SIGINT ignored
    run(FaultJobSpec.from_dict(json.loads(Path(sys.argv[1]).read_text())))
