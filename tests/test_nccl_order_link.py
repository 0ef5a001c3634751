"""``NcclOrderLink`` runs transfers in NCCL's order over gloo: an order NCCL runs completes, one that hangs on NCCL
hangs (three ranks, one launch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import launch_ranks

JOB = Path(__file__).resolve().parent / "nccl_order_job.py"


@pytest.mark.multiprocess
def test_nccl_order_link_runs_what_nccl_runs_and_hangs_where_nccl_hangs(tmp_path: Path) -> None:
    exits = launch_ranks(JOB, None, world=3, work_dir=tmp_path, timeout=90)
    for rank, ended in enumerate(exits):
        assert ended.returncode == 0, f"rank {rank} exited with {ended.returncode}:\n{ended.output[-4000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    # A receive ends when its own data is here, not after the group's other receives: no rank waits.
    assert [r["crossing"]["hung"] for r in ranks] == [False, False, False]
    assert ranks[1]["crossing"]["values"] == {"1": [1.0] * 4, "2": [2.0] * 4}
    assert ranks[2]["crossing"]["values"] == {"3": [3.0] * 4}
    # Each of ranks 0 and 1 receives in a group before the group that sends: on NCCL both wait for ever.
    assert [r["receive_first"]["hung"] for r in ranks] == [True, True, False]
