"""The executed timeline: when each action ran on every rank, as a Chrome trace and a PNG picture."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple


class TimedEvent(NamedTuple):
    """One span on a rank's timeline: an executed action (or a wait inside it), or a simulated one."""

    name: str
    category: str
    start: float
    end: float


COLORS = {
    "forward": "#4c72b0",
    "backward": "#dd8452",
    "backward_weight": "#da8bc3",
    "wait": "#d9d9d9",
    "reduce_grad": "#55a868",
    "all_reduce": "#55a868",
    "reduce_scatter": "#55a868",
    "all_gather": "#8172b3",
    "gather": "#8172b3",
    "reshard": "#c4ad66",
}
FULL_HEIGHT = ("forward", "backward", "backward_weight", "wait")  # others are drawn as a thin strip under the row
OTHER = "#937860"  # sends and receive posts


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


def plot_rows(
    events_by_rank: Mapping[int, Sequence[TimedEvent]], path: str | Path, title: str, xlabel: str, scale: float = 1.0
) -> Path:
    """Draws one row per rank: compute (and waits) full height, communication in a thin strip under it; the gaps in
    the rows are the bubble. Times are multiplied by ``scale``. Needs matplotlib (``pip install -e ".[plot]"``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    origin = min((e.start for events in events_by_rank.values() for e in events), default=0.0)
    ranks = sorted(events_by_rank)
    fig, ax = plt.subplots(figsize=(12, 0.7 * len(ranks) + 1.3))
    seen: dict[str, str] = {}
    for row, rank in enumerate(ranks):
        for e in sorted(events_by_rank[rank], key=lambda e: e.category == "wait"):  # waits over their actions
            color = COLORS.get(e.category, OTHER)
            span = (row - 0.4, 0.6) if e.category in FULL_HEIGHT else (row + 0.22, 0.18)
            ax.broken_barh([((e.start - origin) * scale, (e.end - e.start) * scale)], span, color=color)
            seen.setdefault(e.category if e.category in COLORS else "send / recv", color)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    legend = [Patch(color=color, label=label.replace("_", " ")) for label, color in seen.items()]
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_timeline(events_by_rank: Mapping[int, Sequence[TimedEvent]], path: Path, title: str = "") -> bool:
    """Draws the executed timeline (times in ms); False, with a warning, when matplotlib is not installed."""
    try:
        plot_rows(events_by_rank, path, title or "bfpp executed timeline", "time (ms)", scale=1e3)
    except ImportError:
        warnings.warn(
            "matplotlib is not installed: the timeline PNG is skipped (the Chrome trace is written).", stacklevel=2
        )
        return False
    return True


def write_timeline(events_by_rank: Mapping[int, Sequence[TimedEvent]], directory: str | Path, title: str = "") -> Path:
    """Writes ``timeline.json`` (Chrome trace) and ``timeline.png`` into ``directory``; returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "timeline.json").write_text(json.dumps(chrome_trace(events_by_rank)))
    plot_timeline(events_by_rank, out / "timeline.png", title)
    return out
