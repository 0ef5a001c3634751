"""Kernel efficiency against the number of rows of a matrix product: small micro-batches compute below the peak.

An :class:`EfficiencyCurve` maps the rows of a layer's matrix products (tokens: micro-batch size x sequence length)
to the share of the saturated throughput they reach, 1 for large products. The planner divides compute times by it
(on top of :attr:`~lightning_bfpp.plan.specs.ClusterSpec.compute_efficiency`, the saturated share of the peak), and
batched weight gradients (``W`` actions) run one product over the rows of all the micro-batches they flush.

``python -m lightning_bfpp.plan measure-efficiency`` measures a curve on the local device and writes it as JSON
(:meth:`EfficiencyCurve.to_json`); ``--efficiency-curve FILE`` gives it to the planner. Pure Python, no torch.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EfficiencyCurve:
    """Efficiency at ``points`` ``(rows, efficiency)``, rows increasing; interpolated linearly in ``log(rows)`` and
    constant beyond the first and last point (so the curve saturates at its last value)."""

    points: tuple[tuple[float, float], ...]
    source: str = ""

    def __post_init__(self) -> None:
        points = tuple((float(r), float(e)) for r, e in self.points)
        if not points:
            raise ValueError("an efficiency curve needs at least one (rows, efficiency) point")
        rows = [r for r, _ in points]
        if any(r <= 0 for r in rows) or any(b <= a for a, b in itertools.pairwise(rows)):
            raise ValueError(f"efficiency curve rows must be > 0 and strictly increasing, got {rows}")
        if any(not 0 < e <= 1 for _, e in points):
            raise ValueError(f"efficiencies are fractions in (0, 1], got {[e for _, e in points]}")
        object.__setattr__(self, "points", points)

    def __call__(self, rows: float) -> float:
        """The efficiency of a product over ``rows`` rows."""
        xs = [r for r, _ in self.points]
        i = bisect.bisect_left(xs, rows)
        if i == 0:
            return self.points[0][1]
        if i == len(xs):
            return self.points[-1][1]
        (r0, e0), (r1, e1) = self.points[i - 1], self.points[i]
        return e0 + (e1 - e0) * (math.log(rows) - math.log(r0)) / (math.log(r1) - math.log(r0))

    @property
    def peak(self) -> float:
        """The highest efficiency of the curve (what no product exceeds)."""
        return max(e for _, e in self.points)

    def describe(self) -> str:
        shown = ", ".join(f"{r:g}: {e:.2f}" for r, e in self.points)
        return f"efficiency by rows per product {{{shown}}} ({self.source or 'no source given'})"

    def to_json(self, path: str | Path, **extra: object) -> Path:
        """Writes ``{"source": ..., "points": [[rows, efficiency], ...], **extra}``; :meth:`from_json` reads it."""
        data = {"source": self.source, "points": [list(p) for p in self.points], **extra}
        Path(path).write_text(json.dumps(data, indent=1) + "\n")
        return Path(path)

    @classmethod
    def from_json(cls, path: str | Path) -> EfficiencyCurve:
        """Reads a curve written by :meth:`to_json` (other keys are ignored); ValueError says what is wrong."""
        try:
            data = json.loads(Path(path).read_text())
            points = tuple((r, e) for r, e in data["points"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"{path} is not an efficiency curve ({error}); write one with "
                "`python -m lightning_bfpp.plan measure-efficiency --output FILE`"
            ) from error
        return cls(points, str(data.get("source", path)))


FLAT = EfficiencyCurve(((1.0, 1.0),), "flat: every micro-batch size at the saturated efficiency")
"""No dependence on the micro-batch size (the planner before it modelled one)."""

DEFAULT_GPU_CURVE = EfficiencyCurve(
    ((128.0, 0.45), (256.0, 0.65), (512.0, 0.8), (1024.0, 0.9), (2048.0, 0.95), (4096.0, 1.0)),
    "default: assumed shape for bf16 products of hidden >= 4096 on an A100/H100-class GPU, not a measurement",
)
"""The planner's default curve, an assumption: the usual shape of GEMM throughput against the row count on
data-centre GPUs (rising until the product has enough tiles for every multiprocessor, saturating at a few thousand
rows), chosen on the conservative side. Measure your own with ``python -m lightning_bfpp.plan measure-efficiency``."""
