"""The planner's output: a ranked table of predictions, the best layout per schedule and global batch size as a
Markdown table, and its plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning_bfpp.plan.specs import GB, Prediction

_WIDTHS = {"schedule": 13, "stages_per_rank": 3, "rank_layout": 13, "weight_gradients": 15}  # the default widths
_MERGED = tuple(_WIDTHS)  # the columns shown as a/b where layouts of equal predictions share a row


def _header(widths: dict[str, int]) -> str:
    w = widths
    return (
        f"{'schedule':{w['schedule']}s} {'P':>3s} {'L':>{w['stages_per_rank']}s} {'D':>3s} {'mbs':>3s} {'M':>4s}  "
        f"{'A':>2s} {'sharding':9s} {'ckpt':4s} {'rank layout':{w['rank_layout']}s} "
        f"{'weight grads':{w['weight_gradients']}s} "
        f"{'step ms':>8s} {'tokens/s':>9s} {'TFLOP/s/GPU':>11s} {'MFU':>5s} {'bubble':>6s} {'GiB':>5s}"
    )


HEADER = _header(_WIDTHS)


def _cells(group: Sequence[Prediction]) -> dict[str, str]:
    return {name: "/".join(dict.fromkeys(str(getattr(p.layout, name)) for p in group)) for name in _MERGED}


def format_row(r: Prediction, merged: Sequence[Prediction] = (), widths: dict[str, int] | None = None) -> str:
    """One row; ``merged``: further layouts of the same prediction, their differing values shown as ``a/b``."""
    lay, cell, w = r.layout, _cells([r, *merged]), widths or _WIDTHS
    extrapolated = "*" if r.simulated_micro_batches < lay.num_micro_batches else " "
    return (
        f"{cell['schedule']:{w['schedule']}s} {lay.pipeline_size:3d} "
        f"{cell['stages_per_rank']:>{w['stages_per_rank']}s} {lay.data_parallel_size:3d} {lay.micro_batch_size:3d} "
        f"{lay.num_micro_batches:4d}{extrapolated} "
        f"{lay.accumulation:2d} {lay.sharding:9s} {'yes' if lay.activation_checkpointing else 'no':4s} "
        f"{cell['rank_layout']:{w['rank_layout']}s} {cell['weight_gradients']:{w['weight_gradients']}s} "
        f"{r.step_time * 1e3:8.1f} {r.tokens_per_second:9.0f} {r.tflops_per_gpu:11.1f} {r.mfu:5.1%} "
        f"{r.bubble_fraction:6.1%} {r.peak_memory_bytes / GB:5.1f}"
    )


def _key(r: Prediction) -> tuple[object, ...]:
    """What two rows must share to be merged: the printed prediction and the layout apart from :data:`_MERGED`."""
    lay = r.layout
    numbers = f"{r.step_time * 1e3:.1f} {r.tokens_per_second:.0f} {r.mfu:.1%} {r.bubble_fraction:.1%} "
    numbers += f"{r.peak_memory_bytes / GB:.1f} {r.simulated_micro_batches < lay.num_micro_batches}"
    fields = (lay.pipeline_size, lay.data_parallel_size, lay.micro_batch_size, lay.num_micro_batches)
    return (numbers, *fields, lay.accumulation, lay.sharding, lay.activation_checkpointing)


def merge_rows(results: Sequence[Prediction]) -> list[list[Prediction]]:
    """The predictions grouped by equal rows (:func:`_key`), in the order of their first member."""
    groups: dict[tuple[object, ...], list[Prediction]] = {}
    for r in results:
        groups.setdefault(_key(r), []).append(r)
    return list(groups.values())


def format_table(results: Sequence[Prediction], top: int) -> str:
    """The ``top`` fastest layouts as a text table; layouts with equal predictions share a row (``a/b``)."""
    rows = merge_rows(results)[:top]
    widths = {name: max([width, *(len(_cells(g)[name]) for g in rows)]) for name, width in _WIDTHS.items()}
    lines = [_header(widths), *(format_row(g[0], g[1:], widths) for g in rows)]
    if any(g[0].simulated_micro_batches < g[0].layout.num_micro_batches for g in rows):
        lines.append("* M too large to simulate step by step: extrapolated linearly from two smaller multiples of P")
    if any(len(g) > 1 for g in rows):
        lines.append("a/b: layouts with the same prediction, in one row")
    return "\n".join(lines)


def best_per_schedule(results: Sequence[Prediction], schedules: Sequence[str]) -> dict[str, Prediction | None]:
    return {s: next((r for r in results if r.layout.schedule == s), None) for s in schedules}


def _cell(r: Prediction | None) -> str:
    if r is None:
        return "does not fit"
    lay = r.layout
    return (
        f"**{r.tflops_per_gpu:.0f}** ({r.mfu:.0%}, {r.peak_memory_bytes / GB:.0f} GiB): P={lay.pipeline_size} "
        f"L={lay.stages_per_rank} D={lay.data_parallel_size} mbs={lay.micro_batch_size} M={lay.num_micro_batches}"
        f"{f' A={lay.accumulation}' if lay.accumulation > 1 else ''} {lay.sharding}"
        f"{' ckpt' if lay.activation_checkpointing else ''}{' pp_contiguous' if lay.rank_layout[0] == 'p' else ''}"
        f"{' batched-W' if lay.weight_gradients == 'batched' else ''}"
    )


def format_comparison(table: dict[float, dict[str, Prediction | None]], world: int) -> str:
    """Markdown: per batch size per GPU, the predicted TFLOP/s per GPU (MFU, memory) and layout of each schedule;
    the best column lists every schedule within 0.5% of the fastest."""
    schedules = list(next(iter(table.values()))) if table else []
    lines = [
        "| batch/GPU | global batch | " + " | ".join(schedules) + " | best |",
        "| ---: | ---: | " + " | ".join("---" for _ in schedules) + " | --- |",
    ]
    for per_gpu, best in table.items():
        found = [r for r in best.values() if r is not None]
        top = max((r.tflops_per_gpu for r in found), default=0.0)
        winner = " = ".join(r.layout.schedule for r in found if r.tflops_per_gpu >= 0.995 * top) or "-"
        cells = " | ".join(_cell(best[s]) for s in schedules)
        lines.append(f"| {per_gpu:g} | {round(per_gpu * world)} | {cells} | {winner} |")
    return "\n".join(lines)


def plot_comparison(table: dict[float, dict[str, Prediction | None]], path: str | Path, title: str = "") -> Path:
    """Best predicted TFLOP/s per GPU against the batch size per GPU, one line per schedule (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError('--plot needs matplotlib: pip install -e ".[plot]"') from error
    fig, ax = plt.subplots(figsize=(7, 4.5))
    schedules = list(next(iter(table.values()))) if table else []
    for s in schedules:
        points = [(b, best[s].tflops_per_gpu) for b, best in table.items() if best[s] is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=s)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(table), [f"{b:g}" for b in table])
    ax.set_xlabel("batch size per GPU (sequences)")
    ax.set_ylabel("predicted TFLOP/s per GPU (best layout)")
    ax.set_title(title or "predicted throughput by schedule")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
