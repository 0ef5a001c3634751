"""Nothing of a training step outlives it: activations, stage inputs handed between stages and output gradients are
garbage once the executor returns (in-process, one pipeline rank holding every stage); and the long-run memory
script passes on real processes."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from conftest import run_script
from torch import nn

from lightning_bfpp.plan.schedule import build_schedule
from lightning_bfpp.run.executor import PipelineExecutor

ROOT = Path(__file__).resolve().parents[1]


def _step(executor: PipelineExecutor, layers: nn.ModuleList, refs: list[weakref.ref], keep: list) -> None:
    x = torch.randn(8, 4, dtype=torch.float64)
    micro_batches = list(x.chunk(2))

    def remember(tensor: torch.Tensor) -> None:
        refs.append(weakref.ref(tensor))
        if tensor.requires_grad:
            tensor.register_hook(lambda grad: refs.append(weakref.ref(grad)) or None)

    def forward(stage: int, m: int, inputs: torch.Tensor | None) -> torch.Tensor:
        h = micro_batches[m] if stage == 0 else inputs
        if stage > 0:
            remember(h)  # the stage input handed over by the previous stage
        for layer in layers[2 * stage : 2 * stage + 2]:
            h = torch.tanh(layer(h))
            remember(h)
            keep.append(h)
        return h

    losses = executor.run(forward, lambda m, out: out.square().mean(), loss_scale=0.5)
    assert len(losses) == 2


@pytest.mark.parametrize("schedule", ["breadth_first", "depth_first"])
def test_no_tensor_of_a_step_survives_it(schedule: str) -> None:
    layers = nn.ModuleList([nn.Linear(4, 4).double() for _ in range(6)])
    executor = PipelineExecutor(build_schedule(schedule, 1, 3, 2), 0, None)
    refs: list[weakref.ref] = []
    _step(executor, layers, refs, keep=[])
    assert len(refs) > 12 and all(ref() is None for ref in refs)  # activations, inputs and their gradients
    assert all(p.grad is not None for p in layers.parameters())

    kept: list[torch.Tensor] = []  # the check can fail: a step whose activations someone keeps is caught
    refs.clear()
    _step(executor, layers, refs, keep=kept)
    assert any(ref() is not None for ref in refs)


def test_memory_soak_script_passes() -> None:
    """benchmarks/memory_soak.py, the full 500 steps on P = 2 x D = 2 processes: flat resident memory after warm-up
    (growth under 5%) and no tensor outliving its step, else exit 1."""
    script = ROOT / "benchmarks" / "memory_soak.py"
    code, output = run_script(script, ["--steps", "500", "--warmup", "100"], timeout=300, cwd=ROOT)
    assert code == 0, output[-4000:]
    # the headline (rank 0's last line; other ranks' output may interleave)
    assert any(line.startswith("memory soak ok: P=2 x D=2, 500 steps") for line in output.splitlines()), output[-4000:]
