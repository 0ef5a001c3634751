"""Planning: schedules and their checks, partitions, the cost model, the simulator and the layout search.

Pure Python apart from :mod:`~lightning_bfpp.plan.partition` reading parameter counts: nothing here imports
``torch.distributed`` or Lightning (a lint rule enforces it). The layout search's names are importable from here
(``from lightning_bfpp.plan import plan, ModelSpec``); ``python -m lightning_bfpp.plan`` runs it.
"""

from lightning_bfpp.plan.search import (
    GB,
    PLAN_SCHEDULES,
    RANK_LAYOUTS,
    ClusterSpec,
    Layout,
    ModelSpec,
    Prediction,
    cost_model,
    format_comparison,
    format_table,
    layouts,
    lower_bound,
    main,
    peak_memory,
    plan,
    plot_comparison,
    predict,
    specs_from_args,
)

__all__ = [
    "GB",
    "PLAN_SCHEDULES",
    "RANK_LAYOUTS",
    "ClusterSpec",
    "Layout",
    "ModelSpec",
    "Prediction",
    "cost_model",
    "format_comparison",
    "format_table",
    "layouts",
    "lower_bound",
    "main",
    "peak_memory",
    "plan",
    "plot_comparison",
    "predict",
    "specs_from_args",
]
