"""The Lightning strategy: process groups, Lightning's hooks, and the training step, delegating the pipeline to the
runtime (:class:`~lightning_bfpp.run.pipeline.StagePipeline`)."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor
from typing_extensions import override

from lightning_bfpp.lightning.checkpoints import ShardedCheckpoints
from lightning_bfpp.lightning.collectives import PipelineCollectives
from lightning_bfpp.lightning.consolidated import ConsolidatedCheckpoints
from lightning_bfpp.lightning.evaluation import PipelinedEvaluation
from lightning_bfpp.lightning.internals import (
    SubprocessLauncherMixin,
    accumulates_this_batch,
    call_hook,
    default_process_group_backend,
    init_dist_connection,
    replace_clip_grad_by_norm,
    restore_clip_grad_by_norm,
    skip_loop_backward,
)
from lightning_bfpp.lightning.job_end import JobEnd
from lightning_bfpp.lightning.log_relay import LogRecorder, install_metric_sync, replay
from lightning_bfpp.lightning.module import check_pipeline_module
from lightning_bfpp.lightning.nonfinite_policy import NonFinitePolicy
from lightning_bfpp.lightning.summary import record_whole_model, use_whole_model_summary
from lightning_bfpp.lightning.trainer_checks import check_callbacks, check_optimizers
from lightning_bfpp.options import PipelineOptions, arguments_docstring, option_property
from lightning_bfpp.plan.partition import Partition
from lightning_bfpp.run.faults import explain_lost_rank
from lightning_bfpp.run.groups import PipelineGroups, layout_ranks
from lightning_bfpp.run.host_sync import host_values_together
from lightning_bfpp.run.microbatch import check_loader_batches, split_batch
from lightning_bfpp.run.p2p import PeerLink
from lightning_bfpp.run.pipeline import StagePipeline, step_schedule
from lightning_bfpp.run.process_groups import destroy_at_exit
from lightning_bfpp.run.split import PipelineSplit, plan_split

if TYPE_CHECKING:
    from lightning.fabric.accelerators import Accelerator

SUPPORTED_PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed")
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # the compute dtype of mixed precisions


class BFPPStrategy(
    ConsolidatedCheckpoints,
    ShardedCheckpoints,
    PipelinedEvaluation,
    NonFinitePolicy,
    PipelineCollectives,
    JobEnd,
    SubprocessLauncherMixin,
    ParallelStrategy,
):
    """Breadth-first pipeline parallelism with data-parallel replicas.

    The module's layer stack (``pipeline_layers()``) is cut into ``P * L`` stages; stage ``s`` runs on pipeline
    rank ``s % P`` (looped placement). Each training batch is split into ``M`` micro-batches run by the chosen
    schedule; the ``D = world_size / P`` data-parallel replicas average their gradients. Once set up, ``pipeline``
    holds the runtime (:class:`~lightning_bfpp.run.pipeline.StagePipeline`) of this rank. A signal (SIGTERM, SIGINT)
    to any rank stops every rank together, and no rank outlives a failed run: see
    :class:`~lightning_bfpp.lightning.job_end.JobEnd` (attributes ``signal_grace`` and ``end_grace``).

    Arguments:
        options: a :class:`~lightning_bfpp.options.PipelineOptions`; the keyword arguments below replace its values.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin: Lightning's, as for
            every strategy.
        link_class: the point-to-point link between pipeline ranks (default
            :class:`~lightning_bfpp.run.p2p.PeerLink`); a subclass may instrument or reorder the transfers. Also the
            attribute ``link_class``, read at set-up.
        **option_values: the options (``BFPPStrategy(pipeline_parallel_size=2, micro_batches=8)``), each checked
            when the strategy is created:

    """

    strategy_name = "bfpp"
    # the options, read-only under their keyword names: the runtime reads ``options``, so they are set through the
    # constructor only (``pipeline_parallel_size``, ``micro_batches``, ``process_group_backend``: resolved values)
    stages_per_rank = option_property("stages_per_rank")
    schedule = option_property("schedule")
    partition = option_property("partition")
    schedule_name = option_property("schedule")  # earlier names of the two above
    partition_method = option_property("partition")
    partition_boundaries = option_property("partition_boundaries")
    rank_layout = option_property("rank_layout")
    sharding = option_property("sharding")
    activation_checkpointing = option_property("activation_checkpointing")
    breadth_first_micro_batches = option_property("breadth_first_micro_batches")
    weight_gradients = option_property("weight_gradients")
    nonfinite_loss = option_property("nonfinite_loss")
    timeline_dir = option_property("timeline_dir")
    timeline_batches = option_property("timeline_batches")
    timeout = option_property("timeout")
    save_distributed_checkpoint = option_property("save_distributed_checkpoint")
    materializes_pipeline_layers = True  # meta layers: each rank materializes its own in setup (PipelineModule)

    def __init__(
        self,
        options: PipelineOptions | None = None,
        *,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        link_class: type[PeerLink] = PeerLink,
        **option_values: Any,
    ) -> None:
        options = PipelineOptions.build(options, **option_values)  # checks every option, on every rank
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self.options = options
        self.link_class = link_class
        self._process_group_backend = options.process_group_backend
        self.num_nodes = 1
        self.stage_partition: Partition | None = None  # the layers of each stage, once the module is connected
        self.groups: PipelineGroups | None = None
        self.pipeline: StagePipeline | None = None
        self._split: PipelineSplit | None = None
        self.failed = False  # a run ended with an exception: the process groups are left alone at exit

    # ---------------------------------------------------------------------------------------------- sizes and ranks
    @property
    def pipeline_parallel_size(self) -> int:
        """``P``."""
        size = self.options.pipeline_parallel_size
        return self.world_size if size == "auto" else int(size)

    @property
    def data_parallel_size(self) -> int:
        """``D = world_size / P``."""
        return self.world_size // self.pipeline_parallel_size

    @property
    def micro_batches(self) -> int:
        """``M``."""
        return self.options.micro_batches or self.pipeline_parallel_size

    @property
    def num_stages(self) -> int:
        return self.pipeline_parallel_size * self.stages_per_rank

    @property
    def pipeline_rank(self) -> int:
        """This process's rank within its pipeline."""
        return layout_ranks(self.global_rank, self.world_size, self.pipeline_parallel_size, self.rank_layout)[0]

    @property
    def data_parallel_rank(self) -> int:
        """This process's replica index."""
        return layout_ranks(self.global_rank, self.world_size, self.pipeline_parallel_size, self.rank_layout)[1]

    @property
    def is_last_stage_rank(self) -> bool:
        return self.pipeline_rank == self.pipeline_parallel_size - 1

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self.groups.pipeline if self.groups is not None else None

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.groups.data_parallel if self.groups is not None else None

    @property
    def is_distributed(self) -> bool:
        return True

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.data_parallel_size, "rank": self.data_parallel_rank}

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    @property
    @override
    def handles_gradient_accumulation(self) -> bool:
        return False

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="Breadth-first pipeline parallelism with data-parallel replicas"
        )

    # ------------------------------------------------------------------------------------------------ set-up
    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    @override
    def connect(self, model: pl.LightningModule) -> None:
        # Checks that need no other rank run here, on every rank, before the process group exists.
        check_pipeline_module(model)
        precision = getattr(self.precision_plugin, "precision", "32-true")
        if precision not in SUPPORTED_PRECISIONS:
            raise ValueError(
                f"precision={precision!r} is not supported by BFPPStrategy: use one of "
                f"{', '.join(map(repr, SUPPORTED_PRECISIONS))} (float parameters, with autocast for the mixed ones)."
            )
        self._check_world_size()
        self._split = plan_split(model, self.options, self.pipeline_parallel_size)
        self.stage_partition = self._split.partition
        step_schedule(self.options, self.pipeline_parallel_size, self.micro_batches)  # an invalid one raises here
        super().connect(model)

    def _check_world_size(self) -> None:
        world = self.num_nodes * self.num_processes
        if world % self.pipeline_parallel_size:
            raise ValueError(
                f"The world size ({self.num_nodes} nodes x {self.num_processes} devices = {world}) is not divisible by "
                f"pipeline_parallel_size={self.pipeline_parallel_size}: choose a pipeline_parallel_size that divides "
                f"{world}, or change devices/num_nodes."
            )

    def _warn_without_pipeline(self) -> None:
        if self.pipeline_parallel_size == 1:
            rank_zero_warn(
                f"strategy='bfpp' runs with pipeline_parallel_size=1: no pipeline, each of the {self.world_size} "
                "process(es) holds the whole model. Use strategy='ddp' (or 'fsdp' where the model does not fit) for "
                "data parallelism, or give pipeline_parallel_size > 1 (and as many devices)."
            )

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """Under ``trainer.init_module(empty_init=True)``, the module is built on the meta device: each rank gives
        storage to, and initializes, only its own layers in ``setup`` (see ``PipelineModule.pipeline_init_layer``).
        Otherwise tensors are created on this rank's device, as by other strategies."""
        if not empty_init:
            with super().tensor_init_context(empty_init):
                yield
            return
        with torch.device("meta"), self.precision_plugin.tensor_init_context():
            yield

    @override
    def setup_environment(self) -> None:
        check_callbacks(self.lightning_module.trainer.callbacks)  # on every rank, before the process group exists
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        self._check_world_size()
        self._warn_without_pipeline()
        if self._process_group_backend is None:
            self._process_group_backend = default_process_group_backend(self.root_device)
        assert self.cluster_environment is not None
        kwargs: dict[str, Any] = {"timeout": self.options.timeout}
        if self.root_device.type != "cpu":
            kwargs["device_id"] = self.root_device
        init_dist_connection(self.cluster_environment, self._process_group_backend, **kwargs)
        self.groups = PipelineGroups.create(self.pipeline_parallel_size, self.options.timeout, self.rank_layout)  # type: ignore[arg-type]
        destroy_at_exit(self)  # kept between runs of this process (fit, then validate), destroyed at its exit
        self._watch_job()  # signals, and a rank that fails alone or hangs: every rank ends (job_end.py)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None and self.accelerator is not None and self._split is not None
        assert self.groups is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        record_whole_model(module, self._split.layer_names, self._split.partition)  # for the model summary
        use_whole_model_summary(trainer.callbacks)
        self.pipeline = StagePipeline.build(
            self.options,
            module,
            self.groups,
            self.root_device,
            split=self._split,
            convert=self.precision_plugin.convert_module,
            autocast_dtype=AUTOCAST_DTYPES.get(getattr(self.precision_plugin, "precision", "32-true")),
            link_class=self.link_class,
        )
        self.model = self.pipeline.model
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            check_optimizers(self.optimizers, self.pipeline_parallel_size)  # raised on every rank, here
            schedulers = [config.scheduler for config in self.lr_scheduler_configs]
            self.optimizers = self.pipeline.shard_optimizers(self.optimizers, schedulers)  # ZeRO-1
        self.setup_precision_plugin()
        pipeline = self.pipeline
        replace_clip_grad_by_norm(  # the global norm, over every stage of the pipeline
            self.precision_plugin,
            lambda plugin, optimizer, clip_val: pipeline.clip_grad_norm_(list(plugin.main_params(optimizer)), clip_val),
        )

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """A training loader whose batches would not split into ``M`` micro-batches is refused here, on every rank,
        before its first batch (a ragged last batch would otherwise fail only when the epoch reaches it)."""
        if self.lightning_module.trainer.state.stage == RunningStage.TRAINING:
            check_loader_batches(dataloader, self.micro_batches)
        return super().process_dataloader(dataloader)

    # ------------------------------------------------------------------------------------------------ training
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The pipelined step runs forward and backward itself: Lightning must neither zero the gradients between
        # the step and its (skipped) backward, nor call backward on the returned loss.
        skip_loop_backward(self.lightning_module.trainer)
        super().on_train_batch_start(batch, batch_idx)
        self._requeue_now()  # an agreed SLURM requeue signal, on every rank

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        where = f"the training step of global step {self.lightning_module.trainer.global_step}"
        try:
            with self._explain_lost_rank(where):
                loss = self._training_step(*args, **kwargs)
        except Exception as error:
            self._on_failure(error)  # told to the other ranks before the callbacks' on_exception
            raise
        return loss

    def _explain_lost_rank(self, where: str) -> Any:
        """A failed transfer or collective inside the block is re-raised naming the lost rank and the timeout."""
        return explain_lost_rank(where, self.global_rank, self.options.timeout, self.world_size)  # type: ignore[arg-type]

    def _training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        module, pipeline = self.lightning_module, self.pipeline
        trainer = module.trainer
        assert pipeline is not None
        batch = args[0] if args else kwargs["batch"]
        batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx", 0)
        accumulate = trainer.accumulate_grad_batches

        def zero_grad() -> None:
            for optimizer in trainer.optimizers:
                module.optimizer_zero_grad(trainer.current_epoch, batch_idx, optimizer)

        # On accelerators the gradients are freed before the forwards (a lower peak). On CPU they are freed right
        # before the first backward, as Lightning's own loop does: freeing them first leaves glibc's heap top free
        # during the forwards, which it returns to the system and page-faults back in every step (measured: 2.6x the
        # page faults and ~8% slower steps on one process).
        zeroes = batch_idx % accumulate == 0  # the first batch of an accumulation window
        zero_late = zeroes and self.root_device.type == "cpu"
        if zeroes and not zero_late:
            zero_grad()
        micro_batches = split_batch(batch, self.micro_batches)
        recorder = LogRecorder()

        def loss_fn(m: int, outputs: Any) -> Tensor:
            with recorder.capture(module):
                return module.pipeline_loss(outputs, micro_batches[m])

        steps_optimizer = not accumulates_this_batch(trainer)
        batch_number = trainer.fit_loop.epoch_loop.total_batch_idx
        first, end = self.timeline_batches
        recording = self.timeline_dir is not None and first <= batch_number < end
        losses = pipeline.run(
            micro_batches,
            loss_fn,
            self._loss_scale() / (self.micro_batches * accumulate),
            forward_context=self.precision_plugin.train_step_context,  # the forwards and the loss only
            before_first_backward=zero_grad if zero_late else None,
            reduce_gradients=steps_optimizer,  # reduce gradients only on batches that step the optimizer
            record=recording,
        )
        self._add_losses(batch_idx, losses)
        if recording and batch_number == end - 1:
            pipeline.write_timeline(self.timeline_dir)  # type: ignore[arg-type]
        if steps_optimizer:
            pipeline.finish_step()
        relayed = self._start_relay(torch.stack(losses).mean() if losses else None, recorder)
        assert relayed.loss is not None
        call_hook(trainer, "on_before_backward", relayed.loss.to(self.root_device))
        call_hook(trainer, "on_after_backward")  # may change gradients: before the non-finite check
        # one all-reduce over every rank: the non-finite flags (on batches that step) and the signals received
        signals = self._signal_flags()
        flags = self._start_nonfinite_check(signals, checks=steps_optimizer)
        relay_flag, found = host_values_together(relayed.flag, flags)  # the step's one host read
        assert found is not None
        loss, calls = relayed.result(relay_flag[0] if relay_flag else None)
        replay(module, calls, self.root_device)
        if steps_optimizer:
            self._finish_nonfinite_check(batch_idx, found[: len(found) - len(signals)])
        self._act_on_signals(found[len(found) - len(signals) :])  # every rank acts on a signal any rank received
        assert loss is not None
        return loss.to(self.root_device)

    # ------------------------------------------------------------------------------------------------ the end
    @override
    def teardown(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
        self._end_job_watch()
        super().teardown()

    @override
    def on_exception(self, exception: BaseException) -> None:
        self.failed = not self._on_run_exception(exception)  # an agreed signal stop ends every rank cleanly
        super().on_exception(exception)

    def release_process_groups(self) -> None:
        """Drops this strategy's references to its process groups (at interpreter exit, before they are
        destroyed: see :mod:`lightning_bfpp.run.process_groups`)."""
        self.pipeline = None
        self._step_relay = None
        self.groups = None
        restore_clip_grad_by_norm(self.precision_plugin)  # its closure holds the groups
        if self.model is not None:
            install_metric_sync(self.lightning_module, None)


BFPPStrategy.__doc__ = f"{BFPPStrategy.__doc__.rstrip()}\n{arguments_docstring(indent=' ' * 12)}\n"
