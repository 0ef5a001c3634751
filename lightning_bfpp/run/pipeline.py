"""The pipeline runtime without Lightning: :class:`StagePipeline` splits a model over the pipeline ranks, sets up
its data parallelism, and runs one step of the schedule at a time.

A plain torch training loop (``docs/guide/without-lightning.md``)::

    groups = PipelineGroups.create(pipeline_size=2, timeout=timedelta(minutes=5))
    pipeline = StagePipeline.build(PipelineOptions(pipeline_parallel_size=2), model, groups, device)
    optimizer = pipeline.shard_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    for batch in batches:
        micro = split_batch(batch, pipeline.micro_batches)
        optimizer.zero_grad()
        pipeline.run(micro, lambda m, outputs: loss_fn(outputs, micro[m]), 1 / pipeline.micro_batches)
        pipeline.finish_step()
        optimizer.step()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_bfpp.options import PipelineOptions
from lightning_bfpp.plan.gathering import add_parameter_gathering
from lightning_bfpp.plan.partition import Partition
from lightning_bfpp.plan.schedule import Schedule, build_schedule
from lightning_bfpp.plan.stream_order import validate_stream_order
from lightning_bfpp.plan.timeline import TimedEvent, wall_clock, write_timeline
from lightning_bfpp.plan.weight_flush import add_weight_flush
from lightning_bfpp.run.collectives import all_gather_objects
from lightning_bfpp.run.data_parallel import DataParallel, data_parallel_for
from lightning_bfpp.run.executor import PipelineExecutor, StageIO
from lightning_bfpp.run.grad_clip import clip_grad_norm_global
from lightning_bfpp.run.groups import PipelineGroups
from lightning_bfpp.run.materialize import check_materialized, materialize_layers
from lightning_bfpp.run.microbatch import batch_shapes_key
from lightning_bfpp.run.p2p import PeerLink
from lightning_bfpp.run.recompute import LayerCallError, run_layers
from lightning_bfpp.run.sharding import FSDP_MODES
from lightning_bfpp.run.split import SPLIT_ATTRIBUTE, PipelineModel, PipelineSplit, drop_remote_layers, plan_split
from lightning_bfpp.run.tied import TiedGradients, dedupe_stage_parameters, set_aliases
from lightning_bfpp.run.weight_grad import WeightGradientBatcher
from lightning_bfpp.run.zero import zero_optimizer

LossFn = Callable[[int, StageIO], Tensor]
"""``loss_fn(micro_batch, outputs)``: the loss of a micro-batch from the last stage's outputs."""
StageContext = Callable[[], AbstractContextManager[Any]]


class StagePipeline:
    """This rank's stages of a model split over a pipeline, with their data parallelism; runs the schedule.

    Build it with :meth:`build`. Attributes: ``model`` (the split model), ``split``, ``groups``, ``device``,
    ``micro_batches`` (``M``), ``stage_layers`` (``(layer index, layer)`` of each local stage), ``data_parallel``
    (the :class:`~lightning_bfpp.run.data_parallel.DataParallel` mode), ``tied`` (the tied-gradient sums),
    ``weight_gradients`` (the batcher of ``weight_gradients="batched"``, else None) and ``link_class``.
    """

    def __init__(
        self,
        model: nn.Module,
        options: PipelineOptions,
        split: PipelineSplit,
        groups: PipelineGroups,
        device: torch.device,
        link_class: type[PeerLink],
    ) -> None:
        self.model, self.options, self.split, self.groups, self.device = model, options, split, groups, device
        self.link_class = link_class
        self.micro_batches = options.micro_batches or groups.pipeline_size
        self.stage_layers = {
            stage: [(i, model.get_submodule(split.layer_names[i])) for i in split.partition.layers_of(stage)]
            for stage in split.partition.stages_of(groups.pipeline_rank)
        }
        self.data_parallel: DataParallel | None = None
        self.tied: TiedGradients | None = None
        self.weight_gradients: WeightGradientBatcher | None = None
        self._executors: dict[tuple[bool, int], PipelineExecutor] = {}

    @classmethod
    def build(
        cls,
        options: PipelineOptions,
        model: nn.Module,
        groups: PipelineGroups,
        device: torch.device,
        *,
        split: PipelineSplit | None = None,
        convert: Callable[[nn.Module], nn.Module] | None = None,
        autocast_dtype: torch.dtype | None = None,
        link_class: type[PeerLink] = PeerLink,
    ) -> StagePipeline:
        """Splits ``model`` (a :class:`~lightning_bfpp.run.split.PipelineModel`) and sets up this rank's stages. A
        collective: every rank of the world calls it with the same options and model.

        Arguments:
            options: the pipeline's options (``pipeline_parallel_size`` must equal the pipeline group's size).
            model: the whole model; this rank's layers stay, the others become placeholders.
            groups: this rank's process groups.
            device: where this rank's layers live.
            split: the split worked out earlier by :func:`~lightning_bfpp.run.split.plan_split` (default: now).
            convert: applied to the model once its layers have storage (e.g. a dtype conversion).
            autocast_dtype: the compute dtype of a mixed precision (FSDP2 gathers the parameters in it).
            link_class: the point-to-point link between pipeline ranks; a subclass may order or instrument the
                transfers (one that sets ``emulates_nccl`` gets the NCCL stream-order check).
        """
        # 1. Split first, on every rank without communication: bad input fails before any collective.
        split = split or plan_split(model, options, groups.pipeline_size)
        # 2. One gather: every rank must run the same layout, or the first transfer would wait forever.
        check_ranks_agree(options, split, groups.pipeline_size)
        # 3. Drop the remote layers before materializing: only this rank's layers get storage.
        drop_remote_layers(model, split.layer_names, split.partition, groups.pipeline_rank)
        model.__dict__[SPLIT_ATTRIBUTE] = (split.partition, split.layer_names)
        pipeline = cls(model, options, split, groups, device, link_class)
        # 4. Materialize meta layers before converting and moving them, which needs storage.
        materialize_layers(model, [pair for pairs in pipeline.stage_layers.values() for pair in pairs], device)
        check_materialized(model)
        # 5. Convert and move before ties and sharding: both copy parameters in their final dtype and device.
        pipeline.model = model = (convert or (lambda m: m))(model).to(device)
        # 6. Ties before sharding: the copies are made equal while each is still whole.
        set_aliases(model, split.ties, split.partition, groups.pipeline_rank)
        pipeline.tied = TiedGradients(
            model, split.ties, split.partition, groups.pipeline_rank, groups.pipeline, groups.timeout
        )
        pipeline.tied.broadcast_from_first()
        # 7. Data parallelism once the parameters are final: FSDP2 replaces them by shards.
        pipeline.data_parallel = data_parallel_for(
            options.sharding,
            model,
            pipeline.stage_modules(),
            pipeline.stage_parameters(),
            groups.data_parallel,
            device,
            autocast_dtype,
        )
        # 8. Weight-gradient batching last: it replaces the forwards of the layers as they will run.
        if options.weight_gradients == "batched":
            pipeline.weight_gradients = WeightGradientBatcher(pipeline.stage_modules())
        # 9. NCCL sets up a group's communicators at its first operation: a batch_isend_irecv that not every rank of
        #    the pipeline joins must not be that first operation.
        if groups.pipeline is not None and dist.get_backend(groups.pipeline) == "nccl":
            dist.barrier(group=groups.pipeline, device_ids=[device.index])
        return pipeline

    # ------------------------------------------------------------------------------------------------ the stages
    @property
    def partition(self) -> Partition:
        return self.split.partition

    def stage_modules(self) -> dict[int, list[nn.Module]]:
        """The layers of each local stage."""
        return {stage: [layer for _, layer in pairs] for stage, pairs in self.stage_layers.items()}

    def stage_parameters(self) -> dict[int, list[nn.Parameter]]:
        """The parameters of each local stage; one shared by local stages in the lowest one only."""
        params = {s: [p for _, layer in pairs for p in layer.parameters()] for s, pairs in self.stage_layers.items()}
        return dedupe_stage_parameters(params)

    def schedule(self, micro_batches: int, forward_only: bool = False) -> Schedule:
        """The global schedule this pipeline runs for a step of ``micro_batches`` (see :func:`step_schedule`)."""
        return step_schedule(self.options, self.groups.pipeline_size, micro_batches, forward_only)

    def _executor_for(self, micro_batches: int, forward_only: bool) -> PipelineExecutor:
        key = (forward_only, micro_batches)
        if key not in self._executors:
            schedule = self.schedule(micro_batches, forward_only)
            link = None
            if self.groups.pipeline_size > 1:
                assert self.groups.pipeline is not None
                link = self.link_class(self.groups.pipeline, micro_batches, self.device)
            nccl = self.groups.pipeline is not None and dist.get_backend(self.groups.pipeline) == "nccl"
            if nccl or self.link_class.emulates_nccl:
                validate_stream_order(schedule)  # NCCL runs transfers in issue order: check the order cannot hang
            weight_gradients = None if forward_only else self.weight_gradients
            self._executors[key] = PipelineExecutor(
                schedule, self.groups.pipeline_rank, link, self.data_parallel, weight_gradients=weight_gradients
            )
        return self._executors[key]

    def _stage_forward(self, micro_batches: Sequence[Any], context: StageContext) -> Any:
        """``forward(stage, micro_batch, inputs)`` for the executor, each stage forward inside ``context()``."""
        model, stage_layers, checkpointing = self.model, self.stage_layers, self.options.activation_checkpointing
        data_parallel = self.data_parallel
        assert data_parallel is not None

        def forward(stage: int, m: int, inputs: StageIO | None) -> StageIO:
            batch = micro_batches[m]
            with context():
                x = model.pipeline_input(batch) if stage == 0 else inputs  # type: ignore[operator]
                layer_forward = model.pipeline_layer_forward  # type: ignore[union-attr]
                try:
                    return data_parallel.run(
                        stage, run_layers, layer_forward, stage_layers[stage], x, batch, checkpointing
                    )
                except LayerCallError as error:
                    raise LayerCallError(f"Stage {stage}, micro-batch {m}: {error}") from error.__cause__

        return forward

    # ------------------------------------------------------------------------------------------------- a step
    def run(
        self,
        micro_batches: Sequence[Any],
        loss_fn: LossFn,
        loss_scale: float | Tensor = 1.0,
        *,
        forward_context: StageContext = nullcontext,
        before_first_backward: Callable[[], None] | None = None,
        reduce_gradients: bool = True,
        record: bool = False,
    ) -> list[Tensor]:
        """Runs forward and backward of ``micro_batches`` by the schedule; returns the detached micro-batch losses
        (empty unless this rank holds the last stage). Each loss is multiplied by ``loss_scale`` before its backward
        (e.g. ``1 / M``); gradients accumulate into ``.grad``. ``forward_context`` wraps each stage forward and the
        loss (e.g. autocast); ``before_first_backward`` runs right before the step's first backward (e.g. zeroing
        the gradients late). ``reduce_gradients`` False: the step only accumulates (no data-parallel reduction).
        ``record``: keep the time of each action for :meth:`take_events`. Call :meth:`finish_step` after the last
        step of an accumulation window, before the optimizer step."""
        executor = self._executor_for(len(micro_batches), forward_only=False)
        if record and executor.events is None:
            executor.events = []
        assert self.data_parallel is not None
        self.data_parallel.enabled = reduce_gradients

        def last(m: int, outputs: StageIO) -> Tensor:
            with forward_context():
                loss = loss_fn(m, outputs)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(
                    f"pipeline_loss must return a scalar tensor, got {type(loss).__name__}"
                    f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}: reduce the loss over the batch (mean)."
                )
            return loss.reshape(())

        forward = self._stage_forward(micro_batches, forward_context)
        return executor.run(
            forward,
            last,
            loss_scale,
            before_first_backward=before_first_backward,
            shapes_key=batch_shapes_key(micro_batches),
        )

    def run_forward(
        self,
        micro_batches: Sequence[Any],
        last: Callable[[int, StageIO], None],
        forward_context: StageContext = nullcontext,
    ) -> None:
        """Runs ``micro_batches`` forward only (evaluation), without gradients; the last stage hands each micro-batch's
        outputs to ``last(micro_batch, outputs)``."""
        executor = self._executor_for(len(micro_batches), forward_only=True)
        with torch.no_grad():
            forward = self._stage_forward(micro_batches, forward_context)
            executor.run(forward, last, shapes_key=batch_shapes_key(micro_batches))  # type: ignore[arg-type]

    def finish_step(self) -> None:
        """After the last step of an accumulation window: waits for the data-parallel reductions, then sums the
        gradients of tied copies (after the average, before clipping and the optimizer)."""
        assert self.data_parallel is not None
        self.data_parallel.finish()
        if self.tied is not None:
            self.tied.sum_gradients()

    def take_events(self) -> list[TimedEvent]:
        """The actions recorded by steps run with ``record=True`` since the last call."""
        events: list[TimedEvent] = []
        for executor in self._executors.values():
            events += executor.events or []
            executor.events = None
        return events

    def write_timeline(self, directory: str | Path) -> None:
        """Gathers every rank's recorded actions (:meth:`take_events`; a collective over the world); rank 0 writes the
        trace and the picture into ``directory``."""
        gathered = all_gather_objects(wall_clock(self.take_events()))
        if dist.get_rank() == 0:
            P, L, M = self.groups.pipeline_size, self.options.stages_per_rank, self.micro_batches
            write_timeline(dict(enumerate(gathered)), directory, f"{self.options.schedule}: P={P} L={L} M={M}")

    # --------------------------------------------------------------------------------------- around the step
    def clip_grad_norm_(self, params: Sequence[nn.Parameter], max_norm: float) -> Tensor:
        """Scales the gradients of ``params`` (this rank's) as ``torch.nn.utils.clip_grad_norm_`` would on the unsplit
        model; returns the global norm (over the pipeline, and over the replicas of sharded gradients)."""
        not_counted = self.tied.not_counted() if self.tied is not None else ()  # tied copies count once
        shard_group = self.groups.data_parallel if self.options.sharding in FSDP_MODES else None
        return clip_grad_norm_global(params, max_norm, [self.groups.pipeline], not_counted, shard_group, self.device)

    def shard_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """The optimizer to step: with ``sharding="optimizer"`` (ZeRO-1) a ``ZeroRedundancyOptimizer`` of the same
        class and options over the replicas, else ``optimizer`` itself."""
        if self.options.sharding != "optimizer":
            return optimizer
        return zero_optimizer(optimizer, self.groups.data_parallel)

    def shard_optimizers(self, optimizers: Sequence[Optimizer], lr_schedulers: Sequence[Any] = ()) -> list[Optimizer]:
        """:meth:`shard_optimizer` of each of ``optimizers``; the LR schedulers of a replaced one are re-pointed to
        its replacement."""
        replaced = {id(o): self.shard_optimizer(o) for o in optimizers}
        for scheduler in lr_schedulers:
            scheduler.optimizer = replaced.get(id(scheduler.optimizer), scheduler.optimizer)
        return [replaced[id(o)] for o in optimizers]

    def close(self) -> None:
        """Gives the layers back their own forwards and drops the executors and the data-parallel mode."""
        self._executors.clear()
        if self.weight_gradients is not None:
            self.weight_gradients.remove()
            self.weight_gradients = None
        self.data_parallel = None


def step_schedule(
    options: PipelineOptions, pipeline_size: int, micro_batches: int, forward_only: bool = False
) -> Schedule:
    """The global schedule of a step of ``micro_batches`` on ``pipeline_size`` ranks: the training schedule of
    ``options`` (evaluation, ``forward_only``: always breadth-first), with the parameter gathering of the sharding mode
    and the batched weight-gradient actions. Raises on every rank if the schedule is invalid."""
    schedule = build_schedule(
        "breadth_first" if forward_only else options.schedule,
        pipeline_size,
        options.stages_per_rank,
        micro_batches,
        forward_only=forward_only,
        breadth_first_micro_batches=None if forward_only else options.breadth_first_micro_batches,
    )
    if options.sharding in FSDP_MODES:
        schedule = add_parameter_gathering(schedule, reshard_after_forward=options.sharding == "full")
    if options.weight_gradients == "batched" and not forward_only:
        schedule = add_weight_flush(schedule)
    return schedule


def check_ranks_agree(options: PipelineOptions, split: PipelineSplit, pipeline_size: int) -> None:
    """One gather: every rank must run the same layout on the same layer stack, or the first transfer would wait
    forever. Raised on every rank, naming the ranks that differ."""
    mine = {
        "pipeline_parallel_size": pipeline_size,
        "stages_per_rank": options.stages_per_rank,
        "micro_batches": options.micro_batches or pipeline_size,
        "schedule": options.schedule,
        "breadth_first_micro_batches": options.breadth_first_micro_batches,
        "sharding": options.sharding,
        "layers": len(split.layer_names),
        "partition": split.partition.boundaries,
        "tied": [tie.names for tie in split.ties],
    }
    everyone = all_gather_objects(mine)
    differing = [rank for rank, theirs in enumerate(everyone) if theirs != everyone[0]]
    if differing:
        raise ValueError(
            f"The ranks disagree on the pipeline: rank 0 has {everyone[0]}, but rank {differing[0]} has "
            f"{everyone[differing[0]]} (ranks {differing} differ). Give every rank the same module and strategy "
            "options (same code, config and seed)."
        )


__all__ = ["PipelineGroups", "PipelineModel", "StagePipeline", "check_ranks_agree", "step_schedule"]
