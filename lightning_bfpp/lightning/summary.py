"""The model summary of a pipelined module: every layer with its full parameter count, its pipeline rank and stage.

Each rank holds only its own layers (the others are :class:`~lightning_bfpp.run.split.RemoteLayer` placeholders, and
sharded layers hold a shard), so Lightning's summary would count one rank's share. The sizes of the whole module
are recorded once, before the split (:func:`record_whole_model`), on every rank; :class:`PipelineSummary` reads
them without any communication, so it can run on rank 0 alone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary as ModelSummaryCallback
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import ModelSummary, get_formatted_model_size, get_human_readable_count
from lightning.pytorch.utilities.model_summary import summarize as lightning_summarize
from lightning.pytorch.utilities.model_summary.model_summary import UNKNOWN_SIZE
from torch import nn
from typing_extensions import override

from lightning_bfpp.lightning.internals import SummaryWithColumns, install_summary_factory, summary_max_depth
from lightning_bfpp.plan.partition import Partition

WHOLE_MODEL_ATTRIBUTE = "_bfpp_whole_model"  # set on a module before its remote layers are dropped
RIGHT_ALIGNED = ("Params", "FLOPs", "In sizes", "Out sizes")


@dataclass(frozen=True)
class ModuleRecord:
    """One submodule of the whole (unsplit) module: its class, parameter count and the stages holding it."""

    name: str
    type_name: str
    parameters: int
    stages: tuple[int, ...]  # empty: outside the layer stack (present on every rank, holds no parameters)


@dataclass(frozen=True)
class WholeModel:
    """The sizes of the whole module, recorded on every rank before the split."""

    modules: tuple[ModuleRecord, ...]  # every submodule in ``named_modules()`` order, the root left out
    total_parameters: int
    trainable_parameters: int
    partition: Partition


def record_whole_model(module: nn.Module, layer_names: Sequence[str], partition: Partition) -> WholeModel:
    """Records the sizes of ``module`` while it still holds every layer (meta tensors count as well); a module split
    by an earlier run keeps its first record."""
    recorded = module.__dict__.get(WHOLE_MODEL_ATTRIBUTE)
    if recorded is not None:
        return recorded
    stage_of_layer = {name: s for s in range(partition.num_stages) for name in _names(layer_names, partition, s)}
    records = []
    for name, submodule in list(module.named_modules())[1:]:
        stages = {s for layer, s in stage_of_layer.items() if _related(name, layer)}
        count = sum(p.numel() for p in submodule.parameters())
        records.append(ModuleRecord(name, type(submodule).__name__, count, tuple(sorted(stages))))
    parameters = list(module.parameters())
    whole = WholeModel(
        tuple(records),
        sum(p.numel() for p in parameters),
        sum(p.numel() for p in parameters if p.requires_grad),
        partition,
    )
    module.__dict__[WHOLE_MODEL_ATTRIBUTE] = whole
    return whole


def _names(layer_names: Sequence[str], partition: Partition, stage: int) -> list[str]:
    return [layer_names[i] for i in partition.layers_of(stage)]


def _related(name: str, layer: str) -> bool:
    """Whether module ``name`` is the layer, lies inside it, or contains it."""
    return name == layer or name.startswith(layer + ".") or layer.startswith(name + ".")


def _spans(values: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    spans: list[list[int]] = []
    for v in sorted(set(values)):
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


class _PipelineLayerSummary:
    """One row of :class:`PipelineSummary` (the fields Lightning's summary reads from a layer summary)."""

    def __init__(self, record: ModuleRecord, partition: Partition, live: nn.Module) -> None:
        self.layer_type, self.num_parameters = record.type_name, record.parameters
        self.training = live.training  # the layer, or the placeholder standing in for it on this rank
        self.in_size = self.out_size = UNKNOWN_SIZE
        self.pipeline_ranks = _spans(partition.rank_of(s) for s in record.stages) if record.stages else "all"
        self.stages = _spans(record.stages) if record.stages else "-"


class PipelineSummary(SummaryWithColumns):
    """Lightning's model summary of a module split by ``BFPPStrategy``: every layer of the whole module with its
    parameter count (full size, also when sharded), the pipeline rank(s) and stage(s) holding it, and totals for the
    whole module. Input and output sizes and FLOPs are not measured (the module cannot run a forward on one rank).

    Arguments:
        model: a module set up by ``BFPPStrategy`` (its sizes were recorded before the split).
        max_depth: as for Lightning's ``ModelSummary``: ``-1`` every module, ``0`` none, ``n`` down to depth ``n``.
    """

    def __init__(self, model: pl.LightningModule, max_depth: int = 1) -> None:
        whole = model.__dict__.get(WHOLE_MODEL_ATTRIBUTE)
        if whole is None:
            raise ValueError(
                f"{type(model).__name__} was not set up by BFPPStrategy: summarize it with Lightning's "
                "`lightning.pytorch.utilities.model_summary.summarize`."
            )
        self._whole: WholeModel = whole
        super().__init__(model, max_depth)

    @override
    def summarize(self) -> dict[str, _PipelineLayerSummary]:  # type: ignore[override]
        depth = self.max_depth
        shown = [r for r in self._whole.modules if depth == -1 or (depth > 0 and r.name.count(".") < depth)]
        partition = self._whole.partition
        return OrderedDict((r.name, _PipelineLayerSummary(r, partition, self._live(r.name))) for r in shown)

    def _live(self, name: str) -> nn.Module:
        """The module called ``name`` on this rank, or the placeholder that stands in for the layer holding it."""
        while name:
            try:
                return self.model.get_submodule(name)
            except AttributeError:
                name = name.rpartition(".")[0]
        return self.model

    @property
    @override
    def total_training_modes(self) -> dict[str, int]:
        modes = [self._live(r.name).training for r in self._whole.modules]
        return {"train": modes.count(True), "eval": modes.count(False)}

    @property
    @override
    def total_parameters(self) -> int:
        return self._whole.total_parameters

    @property
    @override
    def trainable_parameters(self) -> int:
        return self._whole.trainable_parameters

    @override
    def extra_columns(self, rows: int) -> list[tuple[str, list[str]]]:
        layers: list[Any] = self.layer_summaries()  # _PipelineLayerSummary rows, built by summarize()
        ranks = [layer.pipeline_ranks for layer in layers] + ["n/a"] * (rows - len(layers))
        stages = [layer.stages for layer in layers] + ["n/a"] * (rows - len(layers))
        return [("Pipeline rank", ranks), ("Stage", stages)]


def use_whole_model_summary(callbacks: Iterable[pl.Callback]) -> None:
    """Makes the ``ModelSummary`` callbacks (``RichModelSummary`` and the one ``enable_model_summary=True`` adds
    included) summarize the whole pipelined module with :class:`PipelineSummary`; a ``RichModelSummary`` also prints
    its columns. A module not set up by ``BFPPStrategy`` keeps Lightning's summary."""
    for callback in callbacks:
        if not isinstance(callback, ModelSummaryCallback):
            continue
        install_summary_factory(callback, _summary)
        if isinstance(callback, RichModelSummary) and type(callback).summarize is RichModelSummary.summarize:
            callback.summarize = print_rich_summary  # type: ignore[method-assign]


def _summary(callback: ModelSummaryCallback, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ModelSummary:
    if WHOLE_MODEL_ATTRIBUTE not in pl_module.__dict__:
        return lightning_summarize(pl_module, max_depth=summary_max_depth(callback))
    return PipelineSummary(pl_module, max_depth=summary_max_depth(callback))


def print_rich_summary(
    summary_data: list[tuple[str, list[str]]],
    total_parameters: int,
    trainable_parameters: int,
    model_size: float,
    total_training_modes: dict[str, int],
    total_flops: int,
    **summarize_kwargs: Any,
) -> None:
    """Prints a summary with rich as ``RichModelSummary`` does, with a column for every entry of ``summary_data``."""
    from rich import get_console
    from rich.table import Table

    table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
    for name, _ in summary_data:
        justify = "right" if name in RIGHT_ALIGNED else "left"
        table.add_column(name, justify=justify, no_wrap=name == "Name", style="dim" if name == " " else None)
    for row in zip(*(values for _, values in summary_data), strict=True):
        table.add_row(*row)
    totals = Table.grid(expand=True)
    totals.add_column()
    for label, value in (
        ("Trainable params", get_human_readable_count(trainable_parameters)),
        ("Non-trainable params", get_human_readable_count(total_parameters - trainable_parameters)),
        ("Total params", get_human_readable_count(total_parameters)),
        ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
        ("Modules in train mode", str(total_training_modes["train"])),
        ("Modules in eval mode", str(total_training_modes["eval"])),
        ("Total FLOPs", get_human_readable_count(total_flops)),
    ):
        totals.add_row(f"[bold]{label}[/]: {value}")
    console = get_console()
    console.print(table)
    console.print(totals)
