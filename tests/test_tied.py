"""Tied weights across stages: the input projection's weight reused by the output layer (as a token embedding by an
LM head). Training matches one process, the copies stay identical, and checkpoints round-trip on any layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TESTS_DIR, run_script
from eval_job import run as run_stages
from models import StackModel
from test_equivalence import assert_matches, reference

from lightning_bfpp.plan.partition import Partition
from lightning_bfpp.run.tied import Tie, check_ties_sharding, find_ties, holders, local_aliases


def test_ties_are_found_by_identity() -> None:
    model = StackModel(num_blocks=2, tied=True)
    names = ["first", "blocks.0", "blocks.1", "head"]
    assert find_ties(model, names) == [Tie(("first.weight", "head.weight"), (0, 3))]
    assert find_ties(StackModel(num_blocks=2), names) == []
    partition = Partition((0, 1, 2, 3, 4), pipeline_size=2)  # stages 0, 2 on rank 0; 1, 3 on rank 1
    tie = find_ties(model, names)[0]
    assert holders(tie, partition) == (0, 1)
    assert local_aliases([tie], partition, 0) == {}
    assert local_aliases([tie], partition, 1) == {"head.weight": "first.weight"}
    for sharding in ("none", "optimizer", "gradients", "full"):  # one copy on each rank: every mode
        check_ties_sharding([tie], sharding, partition)
    one_rank = Partition((0, 1, 2, 3, 4), pipeline_size=1)  # both copies in stages of one rank: one FSDP group each
    check_ties_sharding([tie], "optimizer", one_rank)
    with pytest.raises(ValueError, match=r"lie in two stages of pipeline rank 0, which sharding='full' cannot"):
        check_ties_sharding([tie], "full", one_rank)


@pytest.mark.parametrize(
    ("layout", "optimizer", "sharding"),
    [
        pytest.param((2, 1, 1, 2), "sgd", "none", id="P2-L1-M2"),
        pytest.param((2, 2, 2, 4), "adam", "optimizer", id="P2-L2-D2-M4-zero1"),
        pytest.param((2, 1, 2, 2), "adam", "full", id="P2-L1-D2-M2-zero3"),
    ],
)
def test_tied_weights_train_as_on_one_process(
    run_job, layout: tuple[int, int, int, int], optimizer: str, sharding: str
) -> None:
    """Gradient accumulation and clipping by norm (the tie counted once), also with the optimizer state sharded
    (ZeRO-1): every parameter equals the one-process run, and the first rank's ``first.weight`` is bitwise the last
    rank's ``head.weight``."""
    P, L, D, M = layout
    config = {
        "devices": P * D,
        "strategy": {"pipeline_parallel_size": P, "stages_per_rank": L, "micro_batches": M, "sharding": sharding},
        "model": {"num_blocks": 2 * P * L - 2, "optimizer": optimizer, "tied": True},
        "batch_size": 2 * M,
        "max_steps": 3,
        "accumulate": 2,
        "clip_val": 0.05,
    }
    result = run_job(config, timeout=180)
    assert_matches(result, config, D)
    ranks = result.ranks()
    copies = [r["state"][n] for r in ranks for n in ("first.weight", "head.weight") if n in r["state"]]
    assert len(copies) == 2 * D  # one copy per pipeline end, in each replica
    for copy in copies[1:]:
        assert torch.equal(copy, copies[0])
    initial = StackModel(**config["model"]).first.weight.double()
    assert not torch.allclose(copies[0], initial)  # trained
    unclipped = reference({**config, "clip_val": None}, D)  # the clipping threshold changes the run
    assert not torch.allclose(unclipped["state"]["head.weight"], copies[0])


def test_tied_checkpoint_resumes_on_other_layouts(tmp_path: Path) -> None:
    """Saved on P=2 (a copy on each rank) and resumed on P=1 x D=2 (both names on one rank, one optimizer state), and
    the other way round; a plain one-process checkpoint loads into P=2: each ends as the uninterrupted one-process
    run, with identical copies."""
    model = {"num_blocks": 2, "optimizer": "adam", "lr": 0.05, "tied": True}
    data = {"train_size": 16, "batch_size": 8}  # one epoch = 2 optimizer steps
    root = tmp_path / "root"
    base = {"devices": 1, "root_dir": str(root), "data": data, "out_dir": None}

    def stage(name: str, strategy: dict[str, Any] | None, actions: list[list[Any]], epochs: int) -> dict[str, Any]:
        trainer = {"max_epochs": epochs}
        return {"name": name, "strategy": strategy, "model": model, "trainer": trainer, "actions": actions}

    ref = run_stages({**base, "stages": [stage("full", None, [["fit", None]], 2)]})["full"]
    run_stages({**base, "stages": [stage("plain", None, [["fit", None], ["save", "plain.ckpt"]], 1)]})
    p2, p1 = {"pipeline_parallel_size": 2, "micro_batches": 2}, {"pipeline_parallel_size": 1, "micro_batches": 2}
    stages = [
        stage("first-P2", p2, [["fit", None], ["save", "p2.ckpt"]], 1),
        stage("first-P1", p1, [["fit", None], ["save", "p1.ckpt"]], 1),
        stage("P1-from-P2", p1, [["fit", "p2.ckpt"]], 2),
        stage("P2-from-P1", p2, [["fit", "p1.ckpt"]], 2),
        stage("P2-from-plain", p2, [["fit", "plain.ckpt"]], 2),
    ]
    out = tmp_path / "out"
    out.mkdir()
    cfg = {**base, "devices": 2, "out_dir": str(out), "stages": stages, "pg_timeout": 60}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, output = run_script(TESTS_DIR / "eval_job.py", [str(tmp_path / "config.json")], timeout=240)
    if code != 0:
        pytest.fail(f"job failed with exit code {code}:\n{output[-6000:]}")
    for name in ("P1-from-P2", "P2-from-P1", "P2-from-plain"):
        results = [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(2)]
        merged: dict[str, torch.Tensor] = {}
        for result in results:
            assert (result["epoch"], result["global_step"]) == (2, 4), name
            for key, value in result["state"].items():
                assert key not in merged or torch.equal(merged[key], value), (name, key)  # copies and replicas
                merged[key] = value
        assert sorted(merged) == sorted(ref["state"]), name
        for key, value in ref["state"].items():
            what = f"{name} {key}"
            torch.testing.assert_close(merged[key], value, rtol=1e-9, atol=1e-12, msg=lambda m, w=what: f"{w}: {m}")
        assert torch.equal(merged["first.weight"], merged["head.weight"]), name
