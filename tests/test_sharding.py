"""Sharded data parallelism (ZeRO-1/2/3) matches one process, and breadth-first gathers each stage's parameters
and reduces its gradients a fixed number of times per step, whatever the number of micro-batches."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TESTS_DIR, JobResult, run_script
from eval_job import run
from models import OPTIMIZERS, RegressionData
from test_checkpoint import DATA, _assert_state_equal, _merged, _stage
from test_equivalence import P2_L2_PLACEMENT, assert_matches, assert_whole_model_summary, reference

from lightning_bfpp.plan.gathering import add_parameter_gathering, gathers_per_stage
from lightning_bfpp.plan.schedule import build_schedule
from lightning_bfpp.run.zero import zero_optimizer


def sharded_config(sharding: str, accumulate: int = 1, **strategy) -> dict:
    return {
        "devices": 4,
        "strategy": {
            "pipeline_parallel_size": 2,
            "stages_per_rank": 2,
            "micro_batches": 4,
            "sharding": sharding,
            **strategy,
        },
        "model": {"num_blocks": 4, "optimizer": "adam"},
        "batch_size": 8,
        "max_steps": 3,
        "accumulate": accumulate,
    }


@pytest.mark.parametrize("accumulate", [1, 2], ids=["step", "accumulate2"])
@pytest.mark.parametrize("sharding", ["optimizer", "gradients", "full"])
def test_sharded_training_matches_one_process(run_job, sharding: str, accumulate: int) -> None:
    """P=2 x D=2: every sharding mode trains exactly like the unsplit module on one process, also with gradient
    clipping by norm (over shards and pipeline), and validates like it afterwards (the forward-only schedule gathers
    and frees each stage too). Under ZeRO-3 the model summary shows the full size of every sharded layer."""
    config = {**sharded_config(sharding, accumulate), "validate_after": accumulate == 1}
    if accumulate > 1:
        config["clip_val"] = 0.05
    config["summary"] = sharding == "full" and accumulate == 1
    result = run_job(config, timeout=180)
    ref = assert_matches(result, config, 2)
    if config["summary"]:
        assert_whole_model_summary(result, ref, P2_L2_PLACEMENT)
    if accumulate > 1:  # the threshold is low enough to change the run
        unclipped = reference({**config, "clip_val": None}, 2)
        assert not torch.allclose(unclipped["state"]["head.weight"], result.rank(3)["state"]["head.weight"])
    if config["validate_after"]:  # val_loss is logged per replica (no sync_dist): replicas hold half the rows each
        losses = [rank["validated"][0]["val_loss"] for rank in result.ranks()]  # rank = pipeline rank * 2 + replica
        assert losses[:2] == losses[2:]  # both pipeline ranks of a replica report its loss
        expected = reference(config, 2)["validated"][0]["val_loss"]
        assert sum(losses[:2]) / 2 == pytest.approx(expected, rel=1e-9)


def test_zero1_takes_every_optimizer(run_job) -> None:
    """ZeRO-1 (P=1 x D=2) with every torch.optim optimizer that takes parameter groups, and a user's subclass with a
    constructor argument of its own, trains exactly like the optimizer on one process; LBFGS is refused at set-up on
    every rank with a message that names what to use, and so it is with P = 2 without sharding. One launch for all: a
    fresh module and Trainer per optimizer."""
    names = [name for name in OPTIMIZERS if name != "lbfgs"]
    lbfgs = {"model": {"num_blocks": 2, "optimizer": "lbfgs"}, "expect_error": True}
    pipelined = {"pipeline_parallel_size": 2, "micro_batches": 2}  # P = 2, no sharding
    config = {
        "devices": 2,
        "strategy": {"pipeline_parallel_size": 1, "stages_per_rank": 2, "micro_batches": 2, "sharding": "optimizer"},
        "batch_size": 4,
        "max_steps": 3,
        "runs": [{"name": name, "model": {"num_blocks": 2, "optimizer": name}} for name in names]
        + [{"name": "lbfgs", **lbfgs}, {"name": "lbfgs-pipelined", **lbfgs, "strategy": pipelined}],
    }
    result = run_job(config, timeout=400)
    for run_config in config["runs"][:-2]:
        merged = {**config, **{k: v for k, v in run_config.items() if k != "name"}}
        assert_matches(JobResult(0, result.output, result.out_dir / run_config["name"]), merged, 2)
    errors = sorted((result.out_dir / "lbfgs").glob("rank*.error"))
    assert len(errors) == 2  # refused on every rank
    for error in errors:
        message = error.read_text()
        assert "LBFGS cannot be used with sharding='optimizer'" in message
        assert "Use a first-order optimizer" in message
    errors = sorted((result.out_dir / "lbfgs-pipelined").glob("rank*.error"))
    assert len(errors) == 2  # refused on every rank whenever P > 1, with or without sharding
    for error in errors:
        message = error.read_text()
        assert "LBFGS cannot be used with pipeline_parallel_size=2" in message
        assert "Use a first-order optimizer" in message


class _UnstoredWarmupAdam(torch.optim.Adam):
    def __init__(self, params, lr: float, warmup: int) -> None:
        super().__init__(params, lr=lr)
        self.warmup = warmup  # not in self.defaults: lost when the optimizer is built again


def test_zero1_names_constructor_arguments_missing_from_defaults() -> None:
    optimizer = _UnstoredWarmupAdam([torch.nn.Parameter(torch.zeros(2))], lr=0.1, warmup=4)
    with pytest.raises(ValueError, match=r"lack its constructor argument\(s\) \['warmup'\]\. Store them in"):
        zero_optimizer(optimizer, None)


@pytest.mark.parametrize("micro_batches", [2, 4, 8])
def test_breadth_first_gathers_each_stage_at_most_twice(micro_batches: int) -> None:
    for stages_per_rank in (1, 2, 3):
        full = add_parameter_gathering(build_schedule("breadth_first", 2, stages_per_rank, micro_batches))
        assert max(gathers_per_stage(full).values()) <= 2
        once = add_parameter_gathering(
            build_schedule("breadth_first", 2, stages_per_rank, micro_batches), reshard_after_forward=False
        )
        assert set(gathers_per_stage(once).values()) == {1}


def counted_collectives(run_job, schedule: str, micro_batches: int, steps: int = 2) -> dict[tuple[str, int], float]:
    """Per optimizer step, the all-gathers and reduce-scatters of each stage (ZeRO-3, P=2 x L=2 x D=2)."""
    config = sharded_config("full", schedule=schedule, micro_batches=micro_batches)
    config.update(batch_size=2 * micro_batches, max_steps=steps, count_collectives=True, model={"num_blocks": 4})
    counts: dict[tuple[str, int], float] = {}
    for rank in run_job(config, timeout=180).ranks():
        for (kind, stage), n in rank["collectives"].items():
            assert stage >= 0, f"a {kind} not issued by a stage's FSDP group"
            counts[(kind, stage)] = max(counts.get((kind, stage), 0), n / steps)
    return counts


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_collectives_per_stage_and_step_breadth_first(run_job, micro_batches: int) -> None:
    """Breadth-first gathers each stage once for its forwards and once for its backwards (the last stage of each
    rank, whose backwards follow its forwards, once) and reduce-scatters it once, whatever M."""
    counts = counted_collectives(run_job, "breadth_first", micro_batches)
    gathers = {("all_gather", 0): 2, ("all_gather", 1): 2, ("all_gather", 2): 1, ("all_gather", 3): 1}
    assert counts == {**gathers, **{("reduce_scatter", stage): 1 for stage in range(4)}}


def test_depth_first_gathers_once_per_run(run_job) -> None:
    """Depth-first (interleaved 1F1B) alternates stages every P micro-batches, so it gathers much more often."""
    counts = counted_collectives(run_job, "depth_first", 4)
    expected = gathers_per_stage(add_parameter_gathering(build_schedule("depth_first", 2, 2, 4)))
    assert {stage: counts[("all_gather", stage)] for stage in range(4)} == dict(expected)
    assert sum(expected.values()) > 6  # breadth-first: 2 + 2 + 1 + 1
    assert all(counts[("reduce_scatter", stage)] == 1 for stage in range(4))


def test_checkpoint_resumes_exactly_under_any_sharding_mode(tmp_path) -> None:
    """A checkpoint saved under ZeRO-3 (P=2 x D=2) resumes exactly under ZeRO-3, ZeRO-1 and plain replicas, and one
    saved under ZeRO-1 under ZeRO-2: the files hold each parameter and its optimizer state once, by name, whatever
    the sharding (Adam and an LR scheduler, whose learning rate must survive too). A plain one-file checkpoint of
    the unsplit module loads into ZeRO-3 (each replica takes its shards)."""
    root = tmp_path / "root"
    base = {"devices": 1, "root_dir": str(root), "data": DATA, "out_dir": None}
    ref = run({**base, "stages": [_stage("full", None, [["fit", None]], 2)]})["full"]
    run({**base, "stages": [_stage("first", None, [["fit", None], ["save", "plain.ckpt"]], 1)]})
    layout = {"pipeline_parallel_size": 2, "stages_per_rank": 1, "micro_batches": 2}
    stages = [
        _stage("first", {**layout, "sharding": "full"}, [["fit", None], ["save", "sharded.ckpt"]], 1),
        *(
            _stage(mode, {**layout, "sharding": mode}, [["fit", "sharded.ckpt"]], 2)
            for mode in ("full", "optimizer", "none")
        ),
        _stage("first-zero1", {**layout, "sharding": "optimizer"}, [["fit", None], ["save", "zero1.ckpt"]], 1),
        _stage("gradients", {**layout, "sharding": "gradients"}, [["fit", "zero1.ckpt"]], 2),
        _stage("full-from-plain", {**layout, "sharding": "full"}, [["fit", "plain.ckpt"]], 2),
    ]
    out = tmp_path / "out"
    out.mkdir()
    cfg = {**base, "devices": 4, "out_dir": str(out), "stages": stages, "pg_timeout": 60}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, output = run_script(TESTS_DIR / "eval_job.py", [str(tmp_path / "config.json")], timeout=300)
    assert code == 0, output[-6000:]
    for mode in ("full", "optimizer", "none", "gradients", "full-from-plain"):
        results = [torch.load(out / f"{mode}.rank{r}.pt", weights_only=False) for r in range(4)]
        _assert_state_equal(_merged(results), ref["state"], mode)
        for result in results:
            logged = [step["train_loss"] for step in result["train"]]
            assert logged == pytest.approx([step["train_loss"] for step in ref["train"][2:]], rel=1e-9), mode


def _check_reductions_overlap(events: list[tuple]) -> None:
    """In every batch that steps: each stage's reduction is started by its REDUCE_GRAD action (not inside a
    backward), and none is waited for before the rank's last backward of the batch has run (the wait comes between
    the backwards and the optimizer step). Batches that only accumulate reduce nothing."""
    batches: list[list[tuple]] = []
    for event in events:
        if event[0] == "batch":
            batches.append([])
        elif batches:
            batches[-1].append(event)
    assert batches
    for number, batch in enumerate(batches):
        starts = [e for e in batch if e[0] == "start"]
        if ("step",) not in batch:
            assert starts == [], f"batch {number} only accumulates, yet reduced: {batch}"
            continue
        step = batch.index(("step",))
        last_backward = max(i for i, e in enumerate(batch) if e[0] == "backward")
        reduced = [e[1] for e in batch if e[0] == "reduce_grad"]
        started_by = {e[1]: e[2] for e in starts}
        assert sorted(started_by.values()) == sorted(("reduce_grad", s) for s in reduced), (
            f"batch {number}: reductions not started by the stages' REDUCE_GRAD actions: {batch}"
        )
        waits = [(i, e) for i, e in enumerate(batch) if e[0] == "wait"]
        assert waits, f"batch {number}: no reduction waited for before the step: {batch}"
        for i, (_, n, action) in waits:
            assert last_backward < i < step, (
                f"batch {number}: the reduction started in {started_by[n]} is waited for in {action}, before the "
                f"last backward of the batch (event {i}, last backward {last_backward}, step {step}): {batch}"
            )


@pytest.mark.parametrize("sharding", ["none", "optimizer", "gradients", "full"])
def test_reductions_overlap_backward_and_unused_parameters_stay_without_gradient(run_job, sharding: str) -> None:
    """P=1 x L=2 x D=2 with gradient accumulation: each stage's gradient reduction starts at its REDUCE_GRAD action
    and is waited for only after all the rank's backwards (recorded on the real work handles), so stage 1's reduction
    overlaps stage 0's backward. A block left out of every other optimizer step gets no gradient then, on every
    replica: it keeps none after the reduction, so AdamW (weight decay) neither decays it nor moves its moments, as
    on one process. A block that only some samples use gets a gradient on one replica only in the last step: the
    average over both replicas is the one-process gradient."""
    data = RegressionData()
    used = [[bool((data.x[16 * w + r : 16 * w + 16 : 2, 0] > 1).any()) for r in (0, 1)] for w in range(3)]
    assert used[2] == [False, True]  # the data exercise replicas that disagree
    config = {
        "devices": 2,
        "strategy": {"pipeline_parallel_size": 1, "stages_per_rank": 2, "micro_batches": 2, "sharding": sharding},
        "model": {"num_blocks": 4, "optimizer": "adamw", "skip_block": 1, "gate_block": 2},
        "batch_size": 4,
        "max_steps": 3,
        "accumulate": 2,
        "record_reductions": True,
    }
    result = run_job(config, timeout=180)
    for rank in result.ranks():
        _check_reductions_overlap(rank["reductions"])
    assert_matches(result, config, 2)
