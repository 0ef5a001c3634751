"""The executed timeline records every action of every rank and writes a Chrome trace and a picture."""

from __future__ import annotations

import json
from collections import Counter


def test_timeline_records_every_action_of_every_rank(run_job, tmp_path) -> None:
    out = tmp_path / "timeline"
    config = {
        "devices": 2,
        "strategy": {"pipeline_parallel_size": 2, "stages_per_rank": 2, "micro_batches": 4},
        "model": {"num_blocks": 4},
        "batch_size": 8,
        "max_steps": 4,
        "timeline_dir": str(out),
    }
    run_job(config, timeout=120)
    trace = json.loads((out / "timeline.json").read_text())["traceEvents"]
    spans = [e for e in trace if e["ph"] == "X"]
    per_rank = Counter((e["tid"], e["cat"]) for e in spans)
    # batches 2 and 3 are recorded: each rank runs L * M = 8 forwards and 8 backwards per batch
    for rank in (0, 1):
        assert per_rank[(rank, "forward")] == 16
        assert per_rank[(rank, "backward")] == 16
        assert per_rank[(rank, "reduce_grad")] == 4
    assert per_rank[(1, "recv_act")] == 16 and per_rank[(0, "send_act")] == 16
    assert all(e["dur"] >= 0 for e in spans)
    assert (out / "timeline.png").stat().st_size > 10_000
