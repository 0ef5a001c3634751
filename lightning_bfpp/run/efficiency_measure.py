"""Measures a kernel efficiency curve on this machine's device, for the planner's ``--efficiency-curve``.

    python -m lightning_bfpp.plan measure-efficiency --hidden 8192 --sizes 256,512,1024,2048,4096 --output curve.json

For each size (rows: tokens per micro-batch, i.e. micro-batch size x sequence length) it times the forward and
backward of a transformer block's four matrix products (``h -> 3h``, ``h -> h``, ``h -> 4h``, ``4h -> h``, weight
gradients included) on a ``rows x h`` input, and writes the throughput of each size divided by the best one as an
:class:`~lightning_bfpp.plan.efficiency.EfficiencyCurve` (JSON, with the TFLOP/s measured). Needs torch, unlike the
planner; imported by ``python -m lightning_bfpp.plan`` only for this command.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lightning_bfpp.plan.efficiency import EfficiencyCurve

WIDTHS = ((1, 3), (1, 1), (1, 4), (4, 1))  # (in, out) of a block's Linears, in units of the hidden size


def _block(hidden: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    layers = [nn.Linear(i * hidden, o * hidden, bias=False) for i, o in WIDTHS]
    return nn.ModuleList(layers).to(device=device, dtype=dtype)


def _step(block: nn.Module, x: torch.Tensor) -> None:
    qkv, proj, fc1, fc2 = block  # type: ignore[misc]
    out = proj(qkv(x)[:, : x.shape[1]]) + fc2(fc1(x))
    out.backward(torch.ones_like(out))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(hidden: int, rows: int, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """Median seconds of one forward and backward of the block over ``rows`` rows (after two warm-up steps)."""
    block = _block(hidden, device, dtype)
    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    times = []
    for i in range(repeats + 2):
        _sync(device)
        start = time.perf_counter()
        _step(block, x)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def block_flops(hidden: int, rows: int) -> float:
    """Forward and backward FLOPs of the block's products: 3 x 2 x rows x in x out each."""
    return 6.0 * rows * hidden**2 * sum(i * o for i, o in WIDTHS)


def measure(
    hidden: int, sizes: Sequence[int], device: torch.device, dtype: torch.dtype, repeats: int = 5
) -> tuple[EfficiencyCurve, list[float]]:
    """The curve (throughput of each size over the best) and the TFLOP/s of each size."""
    tflops = [block_flops(hidden, rows) / time_block(hidden, rows, device, dtype, repeats) / 1e12 for rows in sizes]
    best = max(tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    source = (
        f"measured on {name} ({device.type}, {torch.get_num_threads()} threads), {dtype}, hidden {hidden}, "
        f"best {best:.3g} TFLOP/s"
    )
    curve = tuple((float(r), t / best) for r, t in zip(sizes, tflops, strict=True))  # host number
    return EfficiencyCurve(curve, source), tflops


def _sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if not sizes or any(s < 1 for s in sizes) or sizes != sorted(set(sizes)):
        raise argparse.ArgumentTypeError(f"--sizes takes increasing whole numbers >= 1 separated by commas: {text!r}")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_bfpp.plan measure-efficiency", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--hidden", type=int, required=True, help="hidden size of the model to plan")
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=_sizes("128,256,512,1024,2048,4096,8192"),
        help="rows to time: tokens per micro-batch (mbs x sequence length), comma-separated",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(cuda if there)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="(bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per size (median)")
    parser.add_argument("--output", type=Path, default=Path("efficiency.json"), help="curve file (efficiency.json)")
    args = parser.parse_args(argv)
    if args.hidden < 1 or args.repeats < 1:
        parser.error("--hidden and --repeats must be >= 1")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    curve, tflops = measure(args.hidden, args.sizes, device, dtype, args.repeats)
    print(curve.source)
    print(f"{'rows':>7s} {'TFLOP/s':>9s} {'efficiency':>10s}")
    for (rows, efficiency), t in zip(curve.points, tflops, strict=True):
        print(f"{rows:7.0f} {t:9.4f} {efficiency:10.3f}")
    command = "python -m lightning_bfpp.plan measure-efficiency " + " ".join(argv or [])
    path = curve.to_json(args.output, tflops=tflops, hidden=args.hidden, command=command.strip())
    print(f"wrote {path}; plan with it: python -m lightning_bfpp.plan --efficiency-curve {path} ...")
    return 0
