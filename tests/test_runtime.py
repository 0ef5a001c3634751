"""The runtime without Lightning: :class:`~lightning_bfpp.run.pipeline.StagePipeline` in a plain torch loop trains
as the unsplit model does on one process (float64)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch import launch_ranks

JOB = Path(__file__).resolve().parent / "runtime_job.py"
LAYOUTS = {
    "p2_l2_breadth_first": {"pipeline_parallel_size": 2, "stages_per_rank": 2, "micro_batches": 4},
    "p1_d2_full": {"pipeline_parallel_size": 1, "stages_per_rank": 2, "micro_batches": 2, "sharding": "full"},
}


def test_stage_pipeline_in_a_torch_loop_matches_one_process(tmp_path: Path) -> None:
    config = {"out_dir": str(tmp_path), "pg_timeout": 30, "steps": 3, "batch_size": 8, "layouts": LAYOUTS}
    exits = launch_ranks(JOB, config, world=2, work_dir=tmp_path, timeout=120)
    for rank, ended in enumerate(exits):
        if ended.returncode != 0:
            pytest.fail(f"rank {rank} exited with {ended.returncode}:\n{ended.output[-4000:]}")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    reference = ranks[0]["reference"]
    assert [rank["lightning_imported"] for rank in ranks] == [[], []]  # the runtime runs without Lightning
    assert ranks[0]["registered"] == "BFPPStrategy"  # and Lightning imported afterwards knows strategy="bfpp"
    for layout in LAYOUTS:
        runs = [rank[layout] for rank in ranks]
        last_stage = max(run["pipeline_rank"] for run in runs)
        replicas = [run["losses"] for run in runs if run["pipeline_rank"] == last_stage]  # each: its share's mean
        losses = torch.tensor(replicas, dtype=torch.float64).mean(dim=0).tolist()
        torch.testing.assert_close(losses, reference["losses"], rtol=1e-10, atol=0)
        merged = {name: p for run in runs for name, p in run["state"].items()}
        assert merged.keys() == reference["state"].keys(), layout
        for name, expected in reference["state"].items():
            torch.testing.assert_close(merged[name], expected, rtol=1e-10, atol=1e-12, msg=f"{layout}: {name}")
