"""One command that checks the GPU path: a GPT of about 100M parameters on one GPU (NCCL, world size 1), bfpp
against ``strategy="auto"`` side by side, plus one fit per option that only runs on an accelerator in production.

    python benchmarks/gpu_check.py            # one CUDA device, NCCL: under 8 minutes on one H100/H200
    python benchmarks/gpu_check.py --cpu --quick   # the same checks on CPU with gloo and a tiny GPT (the test suite)
    python benchmarks/gpu_check.py --devices N     # breadth-first against 1F1B on N GPUs, measured and predicted
    python benchmarks/gpu_check.py --devices 2 --cpu --quick   # the same comparison on 2 CPU processes (gloo)

Checks (one line each, ``check <name>: ok ...`` or ``check <name>: FAILED <reason>``):

- ``bf16_speed_memory``: ``bf16-mixed``, ``BFPPStrategy(pipeline_parallel_size=1, stages_per_rank=4,
  micro_batches=8)`` and ``auto`` on the same batches; tokens/s from the median of the timed steps after warm-up,
  peak memory from ``torch.cuda.max_memory_allocated`` (reset before each run); both must end with finite losses.
  The timed steps run under ``torch.cuda.set_sync_debug_mode("warn")``: the host syncs inside each step are counted
  (on CPU: the package's own host reads).
- ``fp32_losses``: the same in ``32-true`` for 20 steps; every step's loss equal to ``auto``'s within
  ``rtol=1e-3, atol=1e-4`` (the micro-batches reduce in another order).
- ``sharding_full``, ``weight_gradients_batched``, ``activation_checkpointing_layer``, ``timeline``: one fit each
  that must end with finite losses (the timeline: ``timeline.json`` and ``timeline.png`` written).
- ``fp16_losses``: ``16-mixed`` (loss scaling) against ``auto``'s ``16-mixed`` losses within ``rtol=2e-2``.

``--devices N`` runs only the pipeline comparison of ``gpu_compare.py`` (one process per device, torchrun) instead of
the checks; its last line is ``gpu_compare devices=<N> bf_over_1f1b=<measured> predicted=<simulated> ...``.

The process exits non-zero if a check failed. The last line is
``gpu_check passed=<k>/<n> bfpp_over_auto_tokens=<x> bfpp_over_auto_peak_memory=<y> host_syncs_per_step=<n>``
(memory ``nan`` on CPU, where no peak memory is measured; ``host_syncs_per_step`` is the median over bfpp's timed
steps).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from bfpp_examples.gpt import GPT

from lightning_bfpp import BFPPStrategy
from lightning_bfpp.run.host_sync import host_reads

FULL = {"vocab_size": 8192, "seq_len": 512, "n_layer": 12, "n_head": 12, "n_embd": 768, "batch": 16}  # ~98M
QUICK = {"vocab_size": 64, "seq_len": 16, "n_layer": 4, "n_head": 2, "n_embd": 32, "batch": 16}
FP32_RTOL, FP32_ATOL = 1e-3, 1e-4
FP16_RTOL, FP16_ATOL = 2e-2, 1e-3
PIPELINE = {"pipeline_parallel_size": 1, "stages_per_rank": 4, "micro_batches": 8}


class CheckGPT(GPT):
    """The example GPT with a constant learning rate (the comparison needs no schedule)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-4, weight_decay=0.0)


@dataclass
class Run:
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    host_syncs: list[int] = field(default_factory=list)  # per step, see StepRecorder
    peak_bytes: int = 0


class StepRecorder(pl.Callback):
    """Every step's loss, wall time (the device synchronized around the step) and host syncs inside the step: on a
    GPU the synchronizing CUDA operations that ``torch.cuda.set_sync_debug_mode("warn")`` reports (the package's and
    Lightning's alike); on the CPU, which has none, the package's own host reads (``lightning_bfpp.run.host_sync``)."""

    def __init__(self, run: Run, device: torch.device) -> None:
        self.run, self.device, self._start = run, device, 0.0
        self._warnings: Any = None
        self._caught: list[warnings.WarningMessage] = []
        self._reads = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._sync()
        self._reads = host_reads()
        if self.device.type == "cuda":
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._warnings is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(None, None, None)
            self._warnings = None
            self.run.host_syncs.append(sum("synchroniz" in str(w.message) for w in self._caught))
        else:
            self.run.host_syncs.append(host_reads() - self._reads)
        self._sync()
        self.run.step_seconds.append(time.perf_counter() - self._start)
        self.run.losses.append(float(outputs["loss"]))


class Checker:
    def __init__(self, cpu: bool, quick: bool, steps: int, timed: int) -> None:
        self.cpu = cpu
        self.device = torch.device("cpu" if cpu else "cuda", 0)
        self.shape = QUICK if quick else FULL
        self.steps, self.timed = steps, timed
        self.results: list[bool] = []

    def batches(self, steps: int) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        s = self.shape
        ids = torch.randint(0, s["vocab_size"], (steps, s["batch"], s["seq_len"] + 1), generator=g)
        data = [{"input_ids": x[:, :-1], "labels": x[:, 1:]} for x in ids]
        return DataLoader(data, batch_size=None)

    def fit(self, precision: str, steps: int, bfpp: dict[str, Any] | None) -> Run:
        """One fit on a fresh, identically seeded model; ``bfpp=None``: ``strategy="auto"``."""
        pl.seed_everything(0, verbose=False)
        s = self.shape
        model = CheckGPT(s["vocab_size"], s["seq_len"], s["n_layer"], s["n_head"], s["n_embd"])
        strategy: Any = "auto"
        if bfpp is not None:
            strategy = BFPPStrategy(process_group_backend="gloo" if self.cpu else "nccl", timeout=300, **bfpp)
        kwargs: dict[str, Any] = {"precision": precision}
        if precision == "16-mixed" and self.cpu:  # Lightning refuses precision="16-mixed" on CPU
            kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
        run = Run()
        trainer = pl.Trainer(
            accelerator="cpu" if self.cpu else "gpu",
            devices=1,
            strategy=strategy,
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,  # Lightning's DistributedSampler would shuffle the bfpp runs' batches
            callbacks=[StepRecorder(run, self.device)],
            **kwargs,
        )
        if not self.cpu:
            gc.collect()  # the previous fit's model and optimizer states
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        trainer.fit(model, train_dataloaders=self.batches(steps))
        if not self.cpu:
            run.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        if len(run.losses) != steps or not all(math.isfinite(x) for x in run.losses):
            raise AssertionError(f"losses not finite or missing: {run.losses}")
        return run

    def check(self, name: str, body: Callable[[], str]) -> None:
        try:
            print(f"check {name}: ok {body()}", flush=True)
            self.results.append(True)
        except Exception as error:  # every check reports; the others still run
            reason = f"{type(error).__name__}: {error}".replace("\n", " ")
            print(f"check {name}: FAILED {reason[:600]}", flush=True)
            traceback.print_exc(file=sys.stderr)
            self.results.append(False)

    # ------------------------------------------------------------------------------------------------ the checks
    def speed_and_memory(self) -> tuple[str, dict[str, float]]:
        tokens = self.shape["batch"] * self.shape["seq_len"]
        warmup = self.steps - self.timed
        auto = self.fit("bf16-mixed", self.steps, None)
        bfpp = self.fit("bf16-mixed", self.steps, PIPELINE)
        speed = {k: tokens / statistics.median(r.step_seconds[warmup:]) for k, r in (("auto", auto), ("bfpp", bfpp))}
        spread = max(bfpp.step_seconds[warmup:]) / min(bfpp.step_seconds[warmup:])
        figures = {
            "tokens": speed["bfpp"] / speed["auto"],
            "memory": bfpp.peak_bytes / auto.peak_bytes if auto.peak_bytes else float("nan"),
            "host_syncs": statistics.median(bfpp.host_syncs[warmup:]),
        }
        line = (
            f"tokens/s bfpp={speed['bfpp']:.0f} auto={speed['auto']:.0f} ratio={figures['tokens']:.3f} "
            f"(median of {self.timed} steps after {warmup}, bfpp max/min step {spread:.2f}); peak memory "
            f"bfpp={bfpp.peak_bytes / 2**30:.2f} GiB auto={auto.peak_bytes / 2**30:.2f} GiB "
            f"ratio={figures['memory']:.3f}; host syncs per steady step bfpp={bfpp.host_syncs[warmup:]} "
            f"auto={auto.host_syncs[warmup:]}"
        )
        return line, figures

    def losses_match(self, precision: str, steps: int, rtol: float, atol: float) -> str:
        auto = self.fit(precision, steps, None)
        bfpp = self.fit(precision, steps, PIPELINE)
        worst = max(abs(a - b) - rtol * abs(a) for a, b in zip(auto.losses, bfpp.losses, strict=True))
        if worst > atol:
            pairs = ", ".join(f"{a:.5f}/{b:.5f}" for a, b in zip(auto.losses, bfpp.losses, strict=True))
            raise AssertionError(f"losses differ beyond rtol={rtol} atol={atol} (auto/bfpp per step: {pairs})")
        return f"{steps} steps, losses within rtol={rtol} atol={atol} of auto (last {bfpp.losses[-1]:.4f})"

    def option(self, options: dict[str, Any], steps: int = 4) -> str:
        run = self.fit("bf16-mixed", steps, {**PIPELINE, **options})
        return f"{steps} steps, finite losses (last {run.losses[-1]:.4f})"

    def timeline(self) -> str:
        with tempfile.TemporaryDirectory() as folder:
            self.fit("bf16-mixed", 4, {**PIPELINE, "timeline_dir": folder, "timeline_batches": (1, 3)})
            missing = [f for f in ("timeline.json", "timeline.png") if not (Path(folder) / f).is_file()]
            if missing:
                raise AssertionError(f"not written: {missing}")
        return "4 steps, finite losses, timeline.json and timeline.png written"


def compare_on_devices(devices: int, cpu: bool, quick: bool) -> int:
    """``--devices N``: breadth-first (L = 2) against 1F1B at M = P / 2 on N devices (``gpu_compare.py``)."""
    if not cpu and torch.cuda.device_count() < devices:
        print(f"--devices {devices}: only {torch.cuda.device_count()} CUDA devices here (use --cpu for gloo)")
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_compare import launch

    return launch(devices, cpu, quick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU with gloo (no GPU needed)")
    parser.add_argument("--quick", action="store_true", help="a tiny GPT and few steps")
    parser.add_argument("--devices", type=int, default=None, help="compare breadth-first and 1F1B on N devices")
    args = parser.parse_args(argv)
    if args.devices is not None:
        return compare_on_devices(args.devices, args.cpu, args.quick)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu (and --quick) to check the CPU path")
    torch.set_num_threads(1 if args.cpu else torch.get_num_threads())
    checker = Checker(args.cpu, args.quick, steps=4 if args.quick else 13, timed=2 if args.quick else 10)
    loss_steps = 4 if args.quick else 20
    figures = {"tokens": float("nan"), "memory": float("nan"), "host_syncs": float("nan")}

    def speed() -> str:
        line, measured = checker.speed_and_memory()
        figures.update(measured)
        return line

    checker.check("bf16_speed_memory", speed)
    checker.check("fp32_losses", lambda: checker.losses_match("32-true", loss_steps, FP32_RTOL, FP32_ATOL))
    checker.check("sharding_full", lambda: checker.option({"sharding": "full"}))
    checker.check("weight_gradients_batched", lambda: checker.option({"weight_gradients": "batched"}))
    checker.check("activation_checkpointing_layer", lambda: checker.option({"activation_checkpointing": "layer"}))
    checker.check("timeline", checker.timeline)
    checker.check("fp16_losses", lambda: checker.losses_match("16-mixed", loss_steps, FP16_RTOL, FP16_ATOL))
    passed, total = sum(checker.results), len(checker.results)
    print(
        f"gpu_check passed={passed}/{total} bfpp_over_auto_tokens={figures['tokens']:.3f} "
        f"bfpp_over_auto_peak_memory={figures['memory']:.3f} host_syncs_per_step={figures['host_syncs']:g}",
        flush=True,
    )
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
