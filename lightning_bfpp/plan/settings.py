"""What to run for a planned layout: the ``BFPPStrategy(...)`` call, the Trainer's and data loader's sizes, and the
same as Hydra overrides of the example app (``conf/``), with the strategy's real option names and values."""

from __future__ import annotations

from lightning_bfpp.plan.specs import ClusterSpec, Layout


def strategy_options(layout: Layout) -> dict[str, object]:
    """The options of ``BFPPStrategy`` (:class:`~lightning_bfpp.options.PipelineOptions`) that run ``layout``."""
    return {
        "pipeline_parallel_size": layout.pipeline_size,
        "stages_per_rank": layout.stages_per_rank,
        "micro_batches": layout.num_micro_batches,
        "schedule": layout.schedule,
        "sharding": layout.sharding,
        # the planner's checkpointing keeps each stage's input and recomputes its forward
        "activation_checkpointing": "stage" if layout.activation_checkpointing else "none",
        "rank_layout": layout.rank_layout,
        "weight_gradients": layout.weight_gradients,
    }


def trainer_arguments(layout: Layout, cluster: ClusterSpec) -> dict[str, object]:
    return {
        "devices": cluster.gpus_per_node,
        "num_nodes": cluster.nodes,
        "accumulate_grad_batches": layout.accumulation,
    }


def batch_size(layout: Layout) -> int:
    """The data loader's batch size per data-parallel replica: ``M`` micro-batches of ``micro_batch_size``."""
    return layout.micro_batch_size * layout.num_micro_batches


def _call(name: str, arguments: dict[str, object]) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"


def strategy_call(layout: Layout) -> str:
    """``BFPPStrategy(...)`` with the options of ``layout`` (a Python expression)."""
    return _call("BFPPStrategy", strategy_options(layout))


def hydra_overrides(layout: Layout, cluster: ClusterSpec) -> list[str]:
    """The overrides of the example app's config (``conf/train.yaml``) that run ``layout`` on ``cluster``."""
    overrides = ["trainer=gpu", "strategy=bfpp"]
    overrides += [f"strategy.{k}={v}" for k, v in strategy_options(layout).items()]
    overrides += [f"trainer.{k}={v}" for k, v in trainer_arguments(layout, cluster).items()]
    return [*overrides, f"data.batch_size={batch_size(layout)}"]


def _settings(layout: Layout, cluster: ClusterSpec) -> list[str]:
    trainer = ", ".join(f"{k}={v!r}" for k, v in trainer_arguments(layout, cluster).items())
    return [
        f"  strategy = {strategy_call(layout)}",
        f"  trainer = Trainer(strategy=strategy, {trainer})",
        f"  with a DataLoader of batch_size={batch_size(layout)} (per data-parallel replica, drop_last=True)",
        f"  Hydra: {' '.join(hydra_overrides(layout, cluster))}",
    ]


def format_settings(layouts: list[Layout], cluster: ClusterSpec) -> str:
    """What to run for the fastest of ``layouts`` (fastest first); when it has no pipeline (``P = 1``), the advice
    to use Lightning's data-parallel strategies, and what to run for the fastest layout with a pipeline."""
    if not layouts:
        return ""
    best = layouts[0]
    if best.pipeline_size > 1:
        return "\n".join(["to run the fastest layout:", *_settings(best, cluster)])
    strategy = "ddp" if best.sharding == "none" else "fsdp"
    lines = [
        f"the fastest layout has P = 1 (no pipeline: every GPU holds the whole model): use Lightning's "
        f"strategy={strategy!r} instead of bfpp (Hydra: strategy=ddp), with the data loader's batch_size="
        f"{batch_size(best)} per GPU and accumulate_grad_batches={best.accumulation}."
    ]
    piped = next((layout for layout in layouts if layout.pipeline_size > 1), None)
    if piped is not None:
        lines += ["to run the fastest layout with a pipeline (P > 1):", *_settings(piped, cluster)]
    return "\n".join(lines)
