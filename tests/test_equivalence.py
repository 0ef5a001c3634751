"""A pipelined run matches the same module trained on one process: every parameter and every logged loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from models import RegressionData
from run_job import run

MICRO_BATCH = 2  # samples per micro-batch per replica


def reference(config: dict[str, Any], data_parallel: int) -> dict[str, Any]:
    """The same training on one process with the global batch of all replicas."""
    ref = {k: v for k, v in config.items() if k not in ("strategy", "devices")}
    ref["batch_size"] = config["batch_size"] * data_parallel
    return run(ref)


def assert_matches(result, config: dict[str, Any], data_parallel: int) -> dict[str, Any]:
    """Asserts that ``result`` equals the one-process run of ``config``; returns that run."""
    ref = reference(config, data_parallel)
    ranks = result.ranks()
    assert len(ranks) == config["devices"]
    merged: dict[str, torch.Tensor] = {}
    for rank in ranks:
        for name, value in rank["state"].items():
            if name in merged:  # data-parallel replicas hold identical copies
                torch.testing.assert_close(value, merged[name], rtol=0, atol=0)
            merged[name] = value
    assert merged.keys() == ref["state"].keys()
    for name, value in ref["state"].items():
        torch.testing.assert_close(merged[name], value, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    steps = config.get("max_steps", 3) * config.get("accumulate", 1)
    assert len(ref["losses"]) == steps
    for rank in ranks:
        # the logged loss (sync_dist=True: averaged over replicas) is the one-process loss on every rank, rank 0
        # (a first-stage rank) included
        torch.testing.assert_close(torch.tensor(rank["logged"]), torch.tensor(ref["logged"]), rtol=1e-9, atol=0)
        if data_parallel == 1:  # the returned loss is the replica's batch loss, as under DDP
            torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(ref["losses"]), rtol=1e-9, atol=0)
    return ref


# where the summary places each module of StackModel(num_blocks=4) split uniformly into P=2 x L=2 stages:
# (pipeline rank, stage); stage s holds layers [first, blocks.0], [blocks.1, blocks.2], [blocks.3], [head]
P2_L2_PLACEMENT = {
    "first": ("0", "0"),
    "blocks": ("0-1", "0-2"),
    **{f"blocks.{i}{sub}": (str(s % 2), str(s)) for i, s in enumerate((0, 1, 1, 2)) for sub in ("", ".linear")},
    "head": ("1", "3"),
}


def printed_table(text: str) -> tuple[list[dict[str, str]], list[str]]:
    """The rows (column name -> cell) and the total lines of a summary printed by ``ModelSummary`` (``|`` columns)
    or ``RichModelSummary`` (box drawing), with blanks normalized."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    rich = any(line.startswith("┃") for line in lines)
    header_mark, row_mark = ("┃", "│") if rich else ("|", "|")
    header_at = next(i for i, line in enumerate(lines) if f"{header_mark} Name" in line)
    header = [cell.strip() for cell in lines[header_at].strip("┃").split(header_mark)]
    rows, totals = [], []
    for line in lines[header_at + 1 :]:
        if row_mark in line:
            cells = [cell.strip() for cell in line.strip("│").split(row_mark)]
            rows.append(dict(zip(header, cells, strict=True)))
        elif not set(line) <= set("-━┡┩╇└┘┴─"):
            totals.append(" ".join(line.replace(":", " ").split()))
    return rows, totals


def assert_whole_model_summary(result, ref: dict[str, Any], placement: dict[str, tuple[str, str]]) -> None:
    """``ModelSummary`` and ``RichModelSummary`` print on rank 0 every layer of the whole module with the one-process
    parameter count, the same totals, and the pipeline rank and stage holding each layer."""
    for callback in ("PrintedModelSummary", "PrintedRichModelSummary"):
        rows, totals = printed_table(result.rank(0)["summaries"][callback])
        one_process_rows, one_process_totals = printed_table(ref["summaries"][callback])
        where = {row["Name"]: (row.pop("Pipeline rank", None), row.pop("Stage", None)) for row in rows}
        assert rows == one_process_rows, callback
        assert totals == one_process_totals and len(totals) == 7, callback
        assert where == placement, callback


CASES = [
    # (P, L, D, M), schedule, partition, optimizer, extra config
    pytest.param((2, 1, 1, 4), "breadth_first", "uniform", "sgd", {}, id="P2-L1-M4-bf-sgd"),
    pytest.param((2, 2, 1, 4), "breadth_first", "parameters", "adam", {"wide": True}, id="P2-L2-M4-bf-params-adam"),
    pytest.param((2, 3, 1, 5), "breadth_first", "uniform", "adam", {"tuple_io": True}, id="P2-L3-M5-bf-tuple-adam"),
    pytest.param((2, 2, 2, 4), "breadth_first", "uniform", "sgd", {"accumulate": 2}, id="P2-L2-D2-M4-bf-accum"),
    pytest.param((4, 2, 1, 8), "breadth_first", "uniform", "sgd", {"clip_val": 0.05}, id="P4-L2-M8-bf-clip"),
    pytest.param((1, 2, 2, 3), "breadth_first", "uniform", "adam", {}, id="P1-L2-D2-M3-bf-adam"),
    pytest.param(
        (2, 2, 1, 4), "depth_first", "uniform", "sgd", {"clip_val": 0.05, "summary": True}, id="P2-L2-M4-df-clip"
    ),
    pytest.param((2, 2, 2, 4), "depth_first", "parameters", "adam", {"wide": True}, id="P2-L2-D2-df-params"),
    pytest.param((2, 1, 1, 4), "gpipe", "uniform", "sgd", {"accumulate": 2, "nccl": "rank"}, id="P2-gpipe-accum-nccl"),
    pytest.param((2, 2, 1, 4), "depth_first", "uniform", "sgd", {"nccl": "rank"}, id="P2-L2-M4-df-nccl-streams"),
    pytest.param((4, 2, 1, 8), "breadth_first", "uniform", "adam", {"nccl": "rank"}, id="P4-L2-M8-bf-nccl-streams"),
    pytest.param(
        (2, 1, 1, 4),
        "1f1b",
        "uniform",
        "adam",
        {"clip_val": 0.05, "clip_algorithm": "value", "nccl": "rank"},
        id="P2-1f1b",
    ),
]


@pytest.mark.parametrize(("layout", "schedule", "partition", "optimizer", "extra"), CASES)
def test_pipelined_training_matches_one_process(run_job, layout, schedule, partition, optimizer, extra) -> None:
    P, L, D, M = layout
    num_blocks = max(P * L - 2, 2) + 2
    model = {"num_blocks": num_blocks, "optimizer": optimizer, "tuple_io": extra.get("tuple_io", False)}
    if extra.get("wide"):
        model["wide_blocks"] = [0, 1]
    config = {
        "devices": P * D,
        "strategy": {
            "pipeline_parallel_size": P,
            "stages_per_rank": L,
            "micro_batches": M,
            "schedule": schedule,
            "partition": partition,
        },
        "model": model,
        "batch_size": M * MICRO_BATCH,
        "max_steps": 3,
        "accumulate": extra.get("accumulate", 1),
        "clip_val": extra.get("clip_val"),
        "clip_algorithm": extra.get("clip_algorithm", "norm"),
        "emulate_nccl_streams": extra.get("nccl"),  # NCCL's transfer order and rendezvous, emulated over gloo
        "summary": extra.get("summary", False),
    }
    result = run_job(config, timeout=180)
    ref = assert_matches(result, config, D)
    if config["summary"]:
        assert_whole_model_summary(result, ref, P2_L2_PLACEMENT)
    if config["clip_val"] is not None:  # the clipping threshold is low enough to change the run
        unclipped = reference({**config, "clip_val": None}, D)
        assert not torch.allclose(unclipped["state"]["head.weight"], result.rank(P * D - 1)["state"]["head.weight"])


@pytest.mark.parametrize(("precision", "rtol"), [("32-true", 1e-5)])  # mixed precisions: test_mixed_precision.py
def test_lower_precisions_track_one_process(run_job, precision: str, rtol: float) -> None:
    config = {
        "devices": 2,
        "strategy": {"pipeline_parallel_size": 2, "stages_per_rank": 2, "micro_batches": 2},
        "model": {"num_blocks": 4},
        "batch_size": 4,
        "max_steps": 3,
        "precision": precision,
    }
    result = run_job(config, timeout=120)
    ref = reference(config, 1)
    for rank in result.ranks():
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(ref["losses"]), rtol=rtol, atol=1e-3)


def test_strategy_selected_by_name(run_job) -> None:
    """`Trainer(strategy="bfpp")` after `import lightning_bfpp`: one pipeline over both processes."""
    config = {"devices": 2, "strategy": "bfpp", "model": {"num_blocks": 2}, "batch_size": 4, "max_steps": 2}
    result = run_job(config, timeout=120)
    ranks = result.ranks()
    assert set(ranks[0]["state"]).isdisjoint(ranks[1]["state"])  # each rank holds its own stage only
    assert_matches(result, config, 1)


def test_default_sampler_follows_ddp(run_job) -> None:
    """With Lightning's default ``use_distributed_sampler=True`` and a shuffling loader, P=2 x D=2 trains exactly like
    ``ddp`` on 2 processes: Lightning's DistributedSampler gives replica ``r`` the samples it gives DDP's rank ``r``
    (reshuffled every epoch), and both pipeline ranks of a replica read the same batches."""
    config = {
        "devices": 4,
        "strategy": {"pipeline_parallel_size": 2, "stages_per_rank": 2, "micro_batches": 2},
        "model": {"num_blocks": 2, "optimizer": "adam"},
        "batch_size": 4,
        "data_size": 32,  # 4 batches per replica and epoch: the run goes into a second epoch
        "max_steps": 5,
        "default_sampler": True,
    }
    bfpp = run_job(config, timeout=180, name="bfpp").ranks()
    ddp = run_job({**config, "devices": 2, "strategy": "ddp"}, timeout=120, name="ddp").ranks()
    assert len(bfpp) == 4 and len(ddp) == 2
    for rank in bfpp:
        replica = ddp[rank["rank"] % 2]  # rank = pipeline rank * D + replica
        assert rank["targets"] == replica["targets"]
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(replica["losses"]), rtol=1e-9, atol=0)
        torch.testing.assert_close(torch.tensor(rank["logged"]), torch.tensor(replica["logged"]), rtol=1e-9, atol=0)
        for name, value in rank["state"].items():
            torch.testing.assert_close(value, replica["state"][name], rtol=1e-9, atol=1e-12, msg=lambda m, n=name: n)
    assert {name for rank in bfpp for name in rank["state"]} == set(ddp[0]["state"])
    first_epoch = [y for batch in ddp[0]["targets"][:4] for y in batch]
    targets = RegressionData(size=32).y
    assert first_epoch not in (targets[:16].tolist(), targets[::2].tolist())  # shuffled: not one process's order
    assert ddp[0]["targets"][4] != ddp[0]["targets"][0]  # and shuffled again in the second epoch


def test_validate_after_fit_keeps_the_partition(run_job) -> None:
    """`trainer.validate(model)` after `fit` reuses the split of the fit, also with partition="parameters"."""
    config = {
        "devices": 2,
        "strategy": {"pipeline_parallel_size": 2, "stages_per_rank": 1, "micro_batches": 2, "partition": "parameters"},
        "model": {"num_blocks": 4, "wide_blocks": [0, 1]},
        "batch_size": 4,
        "max_steps": 2,
        "validate_after": True,
    }
    result = run_job(config, timeout=120)
    ref = reference(config, 1)
    for rank in result.ranks():
        assert rank["validated"][0]["val_loss"] == pytest.approx(ref["validated"][0]["val_loss"], rel=1e-9)


@pytest.mark.parametrize("tuple_io", [False, True], ids=["tensor", "tuple"])
def test_sequence_length_may_change_every_batch(run_job, tuple_io: bool) -> None:
    """Shapes travel with each step: batches of sequence length 2, 3, 4, 2, ... train exactly as on one process."""
    config = {
        "devices": 4,
        "strategy": {"pipeline_parallel_size": 2, "stages_per_rank": 2, "micro_batches": 2},
        "model": {"num_blocks": 4, "tuple_io": tuple_io, "optimizer": "adam"},
        "batch_size": 4,
        "max_steps": 5,
        "variable_length": True,
    }
    assert_matches(run_job(config, timeout=150), config, 2)
