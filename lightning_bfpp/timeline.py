"""The executed timeline: when each action ran on every rank, as a Chrome trace and a PNG picture."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from lightning_bfpp.executor import TimedEvent

COLORS = {
    "forward": "#4c72b0",
    "backward": "#dd8452",
    "wait": "#d9d9d9",
    "reduce_grad": "#55a868",
}
COMM = "#8172b3"  # sends and receive posts


def wall_clock(events: Sequence[TimedEvent]) -> list[TimedEvent]:
    """Moves ``perf_counter`` times onto the wall clock so that the events of different processes line up."""
    offset = time.time() - time.perf_counter()
    return [TimedEvent(e.name, e.category, e.start + offset, e.end + offset) for e in events]


def chrome_trace(events_by_rank: Mapping[int, Sequence[TimedEvent]]) -> dict:
    """A ``chrome://tracing`` / Perfetto document: one row (thread) per rank, times in microseconds."""
    origin = min((e.start for events in events_by_rank.values() for e in events), default=0.0)
    trace = [
        {
            "name": e.name,
            "cat": e.category,
            "ph": "X",
            "ts": (e.start - origin) * 1e6,
            "dur": (e.end - e.start) * 1e6,
            "pid": 0,
            "tid": rank,
        }
        for rank, events in sorted(events_by_rank.items())
        for e in events
    ]
    names = [
        {"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"rank {r}"}} for r in events_by_rank
    ]
    return {"traceEvents": names + trace, "displayTimeUnit": "ms"}


def plot_timeline(events_by_rank: Mapping[int, Sequence[TimedEvent]], path: Path, title: str = "") -> bool:
    """Draws ranks as rows, forward/backward/communication coloured; the gaps are the bubble. False without
    matplotlib (``pip install matplotlib``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        warnings.warn(
            "matplotlib is not installed: the timeline PNG is skipped (the Chrome trace is written).", stacklevel=2
        )
        return False
    origin = min((e.start for events in events_by_rank.values() for e in events), default=0.0)
    ranks = sorted(events_by_rank)
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(ranks) + 1.2))
    for row, rank in enumerate(ranks):
        for e in events_by_rank[rank]:
            color = COLORS.get(e.category, COMM)
            ax.broken_barh([((e.start - origin) * 1e3, (e.end - e.start) * 1e3)], (row - 0.4, 0.8), color=color)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title or "bfpp executed timeline")
    legend = [Patch(color=c, label=k) for k, c in COLORS.items()] + [Patch(color=COMM, label="send / recv post")]
    ax.legend(handles=legend, loc="upper right", fontsize="small", ncol=5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_timeline(events_by_rank: Mapping[int, Sequence[TimedEvent]], directory: str | Path, title: str = "") -> Path:
    """Writes ``timeline.json`` (Chrome trace) and ``timeline.png`` into ``directory``; returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "timeline.json").write_text(json.dumps(chrome_trace(events_by_rank)))
    plot_timeline(events_by_rank, out / "timeline.png", title)
    return out
