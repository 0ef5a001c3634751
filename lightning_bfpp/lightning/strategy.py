"""The Lightning strategy: process groups, model splitting, the pipelined training and evaluation steps."""

from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor, nn
from typing_extensions import override

from lightning_bfpp.lightning.checkpoints import ShardedCheckpoints
from lightning_bfpp.lightning.internals import (
    SubprocessLauncherMixin,
    accumulates_this_batch,
    call_hook,
    default_process_group_backend,
    distributed_is_initialized,
    init_dist_connection,
    replace_clip_grad_by_norm,
    restore_clip_grad_by_norm,
    skip_loop_backward,
    sync_ddp_if_available,
)
from lightning_bfpp.lightning.log_relay import (
    LogRecorder,
    PipelineMetricSync,
    StepRelay,
    install_metric_sync,
    refuse_in_pipeline_hook,
    replay,
)
from lightning_bfpp.lightning.module import missing_hooks
from lightning_bfpp.lightning.summary import record_whole_model, use_whole_model_summary
from lightning_bfpp.lightning.trainer_checks import check_callbacks
from lightning_bfpp.options import PipelineOptions, arguments_docstring
from lightning_bfpp.plan.gathering import add_parameter_gathering
from lightning_bfpp.plan.partition import Partition, build_partition
from lightning_bfpp.plan.schedule import Schedule, build_schedule
from lightning_bfpp.plan.stream_order import validate_stream_order
from lightning_bfpp.plan.timeline import wall_clock, write_timeline
from lightning_bfpp.plan.weight_flush import add_weight_flush
from lightning_bfpp.run.collectives import all_gather_objects, relay
from lightning_bfpp.run.executor import PipelineExecutor, StageIO
from lightning_bfpp.run.faults import explain_lost_rank
from lightning_bfpp.run.grad_clip import clip_grad_norm_global
from lightning_bfpp.run.materialize import check_materialized, materialize_layers
from lightning_bfpp.run.microbatch import batch_size_of, merge_outputs, split_batch
from lightning_bfpp.run.nonfinite import NonFiniteCheck, NonFiniteError, back_off
from lightning_bfpp.run.p2p import PeerLink
from lightning_bfpp.run.process_groups import destroy_at_exit
from lightning_bfpp.run.recompute import run_layers
from lightning_bfpp.run.sharding import FSDP_MODES, ShardedStages, StageGradientReducer
from lightning_bfpp.run.split import drop_remote_layers, layer_names
from lightning_bfpp.run.tied import (
    TiedGradients,
    check_ties_sharding,
    dedupe_stage_parameters,
    module_ties,
    set_aliases,
)
from lightning_bfpp.run.weight_grad import WeightGradientBatcher
from lightning_bfpp.run.zero import shard_optimizer_states

if TYPE_CHECKING:
    from lightning.fabric.accelerators import Accelerator
    from torch.distributed.fsdp import MixedPrecisionPolicy

SUPPORTED_PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed")
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # the compute dtype of mixed precisions
SHARDED_ATTRIBUTE = "_bfpp_sharded"  # set on a module once its stages are sharded with FSDP2
SPLIT_ATTRIBUTE = "_bfpp_split"  # set on a module once its remote layers are dropped: (partition, layer names)


class BFPPStrategy(ShardedCheckpoints, SubprocessLauncherMixin, ParallelStrategy):
    """Breadth-first pipeline parallelism with data-parallel replicas.

    The module's layer stack (``pipeline_layers()``) is cut into ``P * L`` stages; stage ``s`` runs on pipeline
    rank ``s % P`` (looped placement). Each training batch is split into ``M`` micro-batches run by the chosen
    schedule; the ``D = world_size / P`` data-parallel replicas average their gradients.

    Arguments:
        options: a :class:`~lightning_bfpp.options.PipelineOptions`; the keyword arguments below replace its values.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin: Lightning's, as for
            every strategy.
        **option_values: the options (``BFPPStrategy(pipeline_parallel_size=2, micro_batches=8)``), each checked
            when the strategy is created:

    """

    strategy_name = "bfpp"
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
        self._pipeline_parallel_size = options.pipeline_parallel_size
        self.stages_per_rank = options.stages_per_rank
        self._micro_batches = options.micro_batches
        self.schedule_name = options.schedule
        self.partition_method = options.partition
        self.partition_boundaries = options.partition_boundaries
        self.rank_layout = options.rank_layout
        self.sharding = options.sharding
        self.activation_checkpointing = options.activation_checkpointing
        self.breadth_first_micro_batches = options.breadth_first_micro_batches
        self.weight_gradients = options.weight_gradients
        self._weight_gradient_batcher: WeightGradientBatcher | None = None
        self._process_group_backend = options.process_group_backend
        self._timeout: timedelta = options.timeout  # type: ignore[assignment]  # a timedelta once checked
        self.timeline_dir = options.timeline_dir
        self.timeline_batches = options.timeline_batches
        self.num_nodes = 1
        self.partition: Partition | None = None
        self.pp_group: dist.ProcessGroup | None = None
        self.dp_group: dist.ProcessGroup | None = None
        self._layer_names: list[str] = []
        self._executors: dict[tuple[bool, int], PipelineExecutor] = {}
        self._data_parallel: StageGradientReducer | ShardedStages | None = None
        self._tied: TiedGradients | None = None
        self._stage_layers_cache: dict[int, list[tuple[int, nn.Module]]] | None = None
        self._link_class: type[PeerLink] = PeerLink  # tests put an emulation of NCCL's ordering over gloo here
        self.nonfinite_loss = options.nonfinite_loss
        self.skipped_steps = 0  # optimizer steps skipped for non-finite values (nonfinite_loss="skip")
        self._nonfinite: NonFiniteCheck | None = None
        self._step_relay: StepRelay | None = None
        self._skip_optimizer_step = False
        self.failed = False  # a run ended with an exception: the process groups are left alone at exit

    # ---------------------------------------------------------------------------------------------- sizes and ranks
    @property
    def pipeline_parallel_size(self) -> int:
        """``P``."""
        return self.world_size if self._pipeline_parallel_size == "auto" else int(self._pipeline_parallel_size)

    @property
    def data_parallel_size(self) -> int:
        """``D = world_size / P``."""
        return self.world_size // self.pipeline_parallel_size

    @property
    def micro_batches(self) -> int:
        """``M``."""
        return self._micro_batches if self._micro_batches is not None else self.pipeline_parallel_size

    @property
    def num_stages(self) -> int:
        return self.pipeline_parallel_size * self.stages_per_rank

    @property
    def pipeline_rank(self) -> int:
        """This process's rank within its pipeline."""
        if self.rank_layout == "dp_contiguous":
            return self.global_rank // self.data_parallel_size
        return self.global_rank % self.pipeline_parallel_size

    @property
    def data_parallel_rank(self) -> int:
        """This process's replica index."""
        if self.rank_layout == "dp_contiguous":
            return self.global_rank % self.data_parallel_size
        return self.global_rank // self.pipeline_parallel_size

    @property
    def is_last_stage_rank(self) -> bool:
        return self.pipeline_rank == self.pipeline_parallel_size - 1

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
        missing = missing_hooks(model)
        if missing:
            raise TypeError(
                f"{type(model).__name__} lacks the pipeline hooks {missing}: subclass `lightning_bfpp.PipelineModule` "
                "and implement pipeline_layers(), pipeline_input(batch) and pipeline_loss(outputs, batch)."
            )
        if not model.automatic_optimization:
            raise ValueError(
                "BFPPStrategy runs forward and backward itself and needs automatic optimization: remove "
                "`self.automatic_optimization = False` from the module."
            )
        precision = getattr(self.precision_plugin, "precision", "32-true")
        if precision not in SUPPORTED_PRECISIONS:
            raise ValueError(
                f"precision={precision!r} is not supported by BFPPStrategy: use one of "
                f"{', '.join(map(repr, SUPPORTED_PRECISIONS))} (float parameters, with autocast for the mixed ones)."
            )
        self._check_world_size()
        split: tuple[Partition, list[str]] | None = getattr(model, SPLIT_ATTRIBUTE, None)
        if split is not None:  # already split by a fit of this run: keep that partition (the layers elsewhere are gone)
            self.partition, self._layer_names = split
            if (
                self.partition.num_stages != self.num_stages
                or self.partition.pipeline_size != self.pipeline_parallel_size
            ):
                raise ValueError(
                    f"{type(model).__name__} was split into {self.partition.num_stages} stages over "
                    f"{self.partition.pipeline_size} pipeline ranks by an earlier run: use the same "
                    "pipeline_parallel_size and stages_per_rank, or load its checkpoint into a fresh module "
                    "(`ckpt_path=...`)."
                )
        else:
            layers = list(model.pipeline_layers())
            self._layer_names = layer_names(model, layers)
            self.partition = build_partition(
                layers,
                self.pipeline_parallel_size,
                self.stages_per_rank,
                self.partition_method,
                self.partition_boundaries,
            )
        self._ties = module_ties(model, self._layer_names)  # tied weights, found before the split
        check_ties_sharding(self._ties, self.sharding, self.partition)
        self._build_schedule(self.micro_batches, forward_only=False)
        super().connect(model)

    def _check_world_size(self) -> None:
        world = self.num_nodes * self.num_processes
        if world % self.pipeline_parallel_size:
            raise ValueError(
                f"The world size ({self.num_nodes} nodes x {self.num_processes} devices = {world}) is not divisible by "
                f"pipeline_parallel_size={self.pipeline_parallel_size}: choose a pipeline_parallel_size that divides "
                f"{world}, or change devices/num_nodes."
            )

    def _build_schedule(self, micro_batches: int, forward_only: bool) -> Schedule:
        schedule = build_schedule(
            "breadth_first" if forward_only else self.schedule_name,
            self.pipeline_parallel_size,
            self.stages_per_rank,
            micro_batches,
            forward_only=forward_only,
            breadth_first_micro_batches=None if forward_only else self.breadth_first_micro_batches,
        )
        if self.sharding in FSDP_MODES:
            schedule = add_parameter_gathering(schedule, reshard_after_forward=self.sharding == "full")
        if self.weight_gradients == "batched" and not forward_only:
            schedule = add_weight_flush(schedule)
        return schedule

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
        if self._process_group_backend is None:
            self._process_group_backend = default_process_group_backend(self.root_device)
        assert self.cluster_environment is not None
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if self.root_device.type != "cpu":
            kwargs["device_id"] = self.root_device
        init_dist_connection(self.cluster_environment, self._process_group_backend, **kwargs)
        self._create_groups()
        destroy_at_exit(self)  # kept between runs of this process (fit, then validate), destroyed at its exit

    def _create_groups(self) -> None:
        P, D = self.pipeline_parallel_size, self.data_parallel_size
        rank_of = (lambda pp, dp: pp * D + dp) if self.rank_layout == "dp_contiguous" else (lambda pp, dp: dp * P + pp)
        pp_ranks = [[rank_of(pp, dp) for pp in range(P)] for dp in range(D)]
        dp_ranks = [[rank_of(pp, dp) for dp in range(D)] for pp in range(P)]
        self.pp_group, _ = dist.new_subgroups_by_enumeration(pp_ranks, timeout=self._timeout)
        self.dp_group, _ = dist.new_subgroups_by_enumeration(dp_ranks, timeout=self._timeout)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None and self.accelerator is not None and self.partition is not None
        self.accelerator.setup(trainer)
        self._check_ranks_agree()
        record_whole_model(self.lightning_module, self._layer_names, self.partition)  # for the model summary
        use_whole_model_summary(trainer.callbacks)
        drop_remote_layers(self.lightning_module, self._layer_names, self.partition, self.pipeline_rank)
        self.lightning_module.__dict__[SPLIT_ATTRIBUTE] = (self.partition, self._layer_names)
        self._stage_layers_cache = None
        self._materialize_local_layers()
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self._setup_ties()
        self._data_parallel = self._setup_data_parallel()
        if self.weight_gradients == "batched" and self._weight_gradient_batcher is None:
            self._weight_gradient_batcher = WeightGradientBatcher(self._stage_modules())
        self.barrier()
        if self._process_group_backend == "nccl":
            # NCCL sets up a group's communicators at its first operation; a batch_isend_irecv that not every rank of
            # the pipeline joins must not be that first operation
            dist.barrier(group=self.pp_group, device_ids=[self.root_device.index])
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            if self.sharding == "optimizer":
                shard_optimizer_states(self, self.dp_group)
        self.setup_precision_plugin()
        self._patch_gradient_clipping()
        self._executors.clear()

    def _setup_data_parallel(self) -> StageGradientReducer | ShardedStages:
        """Gradient averaging, or each local stage sharded with FSDP2 (once per module: a later fit or validate of
        the same module reuses the sharded stages)."""
        if self.sharding not in FSDP_MODES:
            return StageGradientReducer(self._stage_parameters(), self.dp_group)
        assert self.dp_group is not None
        sharded = self.lightning_module.__dict__.get(SHARDED_ATTRIBUTE)
        if sharded is None:
            policy = self._fsdp_mixed_precision()
            sharded = ShardedStages(self._stage_modules(), self.dp_group, self.root_device, policy)
            self.lightning_module.__dict__[SHARDED_ATTRIBUTE] = sharded
        return sharded

    def _fsdp_mixed_precision(self) -> MixedPrecisionPolicy | None:
        """With a mixed precision, FSDP gathers the parameters in the autocast dtype and reduces the gradients in
        float32; the stage inputs are left alone (autocast casts each operation's inputs, so the activations between
        layers keep the dtypes they have on one process). None (full precision) otherwise."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        dtype = AUTOCAST_DTYPES.get(getattr(self.precision_plugin, "precision", "32-true"))
        if dtype is None:
            return None
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)

    def _check_ranks_agree(self) -> None:
        """One gather at set-up: every rank must run the same layout on the same layer stack, or the first transfer
        would wait forever. Raised on every rank, naming the ranks that differ."""
        assert self.partition is not None
        mine = {
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "stages_per_rank": self.stages_per_rank,
            "micro_batches": self.micro_batches,
            "schedule": self.schedule_name,
            "breadth_first_micro_batches": self.breadth_first_micro_batches,
            "sharding": self.sharding,
            "layers": len(self._layer_names),
            "partition": self.partition.boundaries,
            "tied": [tie.names for tie in self._ties],
        }
        everyone = all_gather_objects(mine)
        differing = [rank for rank, theirs in enumerate(everyone) if theirs != everyone[0]]
        if differing:
            raise ValueError(
                f"The ranks disagree on the pipeline: rank 0 has {everyone[0]}, but rank {differing[0]} has "
                f"{everyone[differing[0]]} (ranks {differing} differ). Give every rank the same module and strategy "
                "options (same code, config and seed)."
            )

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @property
    def _stage_layers(self) -> dict[int, list[tuple[int, nn.Module]]]:
        """``(layer index, layer)`` of each local stage, looked up once per set-up (the step runs them often)."""
        if self._stage_layers_cache is None:
            assert self.partition is not None
            module = self.lightning_module
            self._stage_layers_cache = {
                stage: [(i, module.get_submodule(self._layer_names[i])) for i in self.partition.layers_of(stage)]
                for stage in self.partition.stages_of(self.pipeline_rank)
            }
        return self._stage_layers_cache

    def _stage_modules(self) -> dict[int, list[nn.Module]]:
        """The layers of each local stage."""
        return {stage: [layer for _, layer in pairs] for stage, pairs in self._stage_layers.items()}

    def _stage_parameters(self) -> dict[int, list[nn.Parameter]]:
        params = {s: [p for _, layer in layers for p in layer.parameters()] for s, layers in self._stage_layers.items()}
        return dedupe_stage_parameters(params)  # a parameter shared by local stages: in the lowest one only

    def _materialize_local_layers(self) -> None:
        """Layers created on the meta device: this rank's get storage and their initialization (materialize.py)."""
        module = self.lightning_module
        materialize_layers(module, [pair for pairs in self._stage_layers.values() for pair in pairs], self.root_device)
        check_materialized(module)

    def _setup_ties(self) -> None:
        """Copies of tied weights: one process group per set of holding ranks, copies made equal (see tied.py)."""
        assert self.partition is not None
        module = self.lightning_module
        set_aliases(module, self._ties, self.partition, self.pipeline_rank)
        self._tied = TiedGradients(module, self._ties, self.partition, self.pipeline_rank, self.pp_group, self._timeout)
        self._tied.broadcast_from_first()

    def _patch_gradient_clipping(self) -> None:
        groups = [self.pp_group]
        shard_group = self.dp_group if self.sharding in FSDP_MODES else None  # gradients sharded over the replicas

        def clip_grad_by_norm(plugin: Precision, optimizer: Any, clip_val: float) -> None:
            not_counted = self._tied.not_counted() if self._tied is not None else ()  # tied copies count once
            params = list(plugin.main_params(optimizer))
            clip_grad_norm_global(params, clip_val, groups, not_counted, shard_group, self.root_device)

        replace_clip_grad_by_norm(self.precision_plugin, clip_grad_by_norm)

    def _executor(self, micro_batches: int, forward_only: bool) -> PipelineExecutor:
        key = (forward_only, micro_batches)
        if key not in self._executors:
            schedule = self._build_schedule(micro_batches, forward_only)
            link = None
            if self.pipeline_parallel_size > 1:
                link = self._link_class(self.pp_group, micro_batches, self.root_device)
            if self._process_group_backend == "nccl" or self._link_class.emulates_nccl:
                validate_stream_order(schedule)  # NCCL runs transfers in issue order: check the order cannot hang
            self._executors[key] = PipelineExecutor(
                schedule,
                self.pipeline_rank,
                link,
                self._data_parallel,
                weight_gradients=None if forward_only else self._weight_gradient_batcher,
            )
        return self._executors[key]

    # ------------------------------------------------------------------------------------------- running stages
    def _stage_forward(
        self, micro_batches: list[Any], context: Callable[[], AbstractContextManager[Any]] = nullcontext
    ) -> Any:
        """``forward(stage, micro_batch, inputs)`` for the executor; each stage forward runs inside ``context()``
        (the precision plugin's autocast while training: the backwards then run outside it, as in Lightning's loop)."""
        module, stage_layers, checkpointing = self.lightning_module, self._stage_layers, self.activation_checkpointing
        data_parallel = self._data_parallel
        assert data_parallel is not None

        def forward(stage: int, m: int, inputs: StageIO | None) -> StageIO:
            batch = micro_batches[m]
            with context():
                x = module.pipeline_input(batch) if stage == 0 else inputs
                return data_parallel.run(
                    stage, run_layers, module.pipeline_layer_forward, stage_layers[stage], x, batch, checkpointing
                )

        return forward

    # ------------------------------------------------------------------------------------------------ training
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The pipelined step runs forward and backward itself: Lightning must neither zero the gradients between
        # the step and its (skipped) backward, nor call backward on the returned loss.
        skip_loop_backward(self.lightning_module.trainer)
        super().on_train_batch_start(batch, batch_idx)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        with self._explain_lost_rank(f"the training step of global step {self.lightning_module.trainer.global_step}"):
            return self._training_step(*args, **kwargs)

    def _explain_lost_rank(self, where: str) -> Any:
        """A failed transfer or collective inside the block is re-raised naming the lost rank and the timeout."""
        return explain_lost_rank(where, self.global_rank, self._timeout)

    def _training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        module = self.lightning_module
        trainer = module.trainer
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
        steps_optimizer = not accumulates_this_batch(trainer)
        assert self._data_parallel is not None
        self._data_parallel.enabled = steps_optimizer  # reduce gradients only on batches that step the optimizer

        forward_context = self.precision_plugin.train_step_context  # the forwards and the loss only

        def last(m: int, outputs: StageIO) -> Tensor:
            with recorder.capture(module), forward_context():
                loss = module.pipeline_loss(outputs, micro_batches[m])
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(
                    f"pipeline_loss must return a scalar tensor, got {type(loss).__name__}"
                    f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}: reduce the loss over the batch (mean)."
                )
            return loss.reshape(())

        executor = self._executor(self.micro_batches, forward_only=False)
        batch_number = trainer.fit_loop.epoch_loop.total_batch_idx
        recording = (
            self.timeline_dir is not None and self.timeline_batches[0] <= batch_number < self.timeline_batches[1]
        )
        if recording and executor.events is None:
            executor.events = []
        losses = executor.run(
            self._stage_forward(micro_batches, forward_context),
            last,
            self._loss_scale() / (self.micro_batches * accumulate),
            before_first_backward=zero_grad if zero_late else None,
        )
        if self._nonfinite is None:
            self._nonfinite = NonFiniteCheck(self.global_rank, self.root_device)
        self._nonfinite.add_losses(batch_idx, losses)
        if recording and batch_number == self.timeline_batches[1] - 1:
            self._write_timeline(executor)
        if steps_optimizer:
            self._data_parallel.finish()
            if self._tied is not None:
                self._tied.sum_gradients()  # after the data-parallel average, before clipping and the optimizer
        loss = self._relay_step(torch.stack(losses).mean() if losses else None, recorder)
        call_hook(trainer, "on_before_backward", loss)
        call_hook(trainer, "on_after_backward")
        if steps_optimizer:
            self._check_nonfinite(batch_idx)
        return loss

    def _check_nonfinite(self, batch_idx: int) -> None:
        """Agrees on every rank whether a loss of this accumulation window or a gradient is non-finite; then raises,
        or zeroes the gradients and marks the optimizer step to be skipped (see :meth:`optimizer_step`).

        With a gradient scaler (``16-mixed``), non-finite gradients alone are an overflow of the scaled gradients:
        every rank skips the step and backs off the scale, whatever ``nonfinite_loss`` says."""
        assert self._nonfinite is not None
        module = self.lightning_module
        trainer = module.trainer
        found = self._nonfinite.check((n, p.grad) for n, p in module.named_parameters() if p.grad is not None)
        if not found:
            return
        scaler = self._scaler
        overflow = scaler is not None and self._nonfinite.gradients_only
        where = f"global step {trainer.global_step} (batch {batch_idx} of epoch {trainer.current_epoch})"
        if self.nonfinite_loss == "raise" and not overflow:
            raise NonFiniteError(
                f"Non-finite values at {where}: {'; '.join(found)}. Look for the cause (learning rate, data, "
                "initialisation), or skip such optimizer steps with BFPPStrategy(nonfinite_loss='skip') "
                "(Hydra: strategy.nonfinite_loss=skip)."
            )
        for optimizer in trainer.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self._skip_optimizer_step = True
        if scaler is not None:
            back_off(scaler)
        if not overflow:
            self.skipped_steps += 1
            rank_zero_warn(
                f"Skipped the optimizer step at {where}: {'; '.join(found)} ({self.skipped_steps} step(s) skipped so "
                "far)."
            )

    @property
    def _scaler(self) -> torch.amp.GradScaler | None:
        """The precision plugin's enabled gradient scaler (``16-mixed``), or None."""
        scaler = getattr(self.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _loss_scale(self) -> float:
        """The scaler's current scale (1 without one), read on every rank: scaling creates the scale on this rank's
        device, which unscaling the gradients needs on ranks without the loss too."""
        scaler = self._scaler
        return 1.0 if scaler is None else float(scaler.scale(torch.ones((), device=self.root_device)))

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        """With ``nonfinite_loss="skip"`` or a gradient scaler, runs the training step (the closure) first and steps
        the optimizer only if no rank found a non-finite loss or gradient. The scaler then unscales (before clipping),
        steps and grows its scale as on one process: every rank's gradients are finite, so every rank agrees."""
        if self.nonfinite_loss != "skip" and self._scaler is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        result = closure()
        if self._skip_optimizer_step:
            self._skip_optimizer_step = False
            return result
        return super().optimizer_step(optimizer, lambda: result, model, **kwargs)

    def _write_timeline(self, executor: PipelineExecutor) -> None:
        """Gathers every rank's recorded events; rank 0 writes the trace and the picture."""
        events, executor.events = wall_clock(executor.events or []), None
        gathered = all_gather_objects(events)
        if self.global_rank == 0:
            title = (
                f"{self.schedule_name}: P={self.pipeline_parallel_size} L={self.stages_per_rank} M={self.micro_batches}"
            )
            write_timeline(dict(enumerate(gathered)), self.timeline_dir, title)  # type: ignore[arg-type]

    def _relay_step(self, loss: Tensor | None, recorder: LogRecorder) -> Tensor:
        """The training step's :meth:`_relay_from_last_stage` of the batch loss: while the logged names and options stay
        the same, one tensor broadcast per step (see :class:`~lightning_bfpp.lightning.log_relay.StepRelay`)."""
        if self._step_relay is None or self._step_relay.group is not self.pp_group:
            self._step_relay = StepRelay(self.pp_group, self.pipeline_parallel_size - 1, self.root_device)
        last = self.is_last_stage_rank
        assert not last or loss is not None
        loss, calls = self._step_relay(loss.cpu() if last else None, recorder.calls() if last else None)
        replay(self.lightning_module, calls, self.root_device)
        return loss.to(self.root_device)

    def _relay_from_last_stage(self, result: Any, recorder: LogRecorder) -> Any:
        """Sends ``result`` (computed on the last stage; ignored elsewhere) and the calls ``recorder`` captured there to
        every rank of the pipeline, replays the calls on every rank, and returns the result on this rank's device."""
        payload = (move_data_to_device(result, "cpu"), recorder.calls()) if self.is_last_stage_rank else None
        result, calls = relay(payload, self.pp_group, self.pipeline_parallel_size - 1)
        replay(self.lightning_module, calls, self.root_device)
        return move_data_to_device(result, self.root_device)

    # ---------------------------------------------------------------------------------------------- evaluation
    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self._install_metric_sync()

    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._install_metric_sync()

    @override
    def on_test_start(self) -> None:
        super().on_test_start()
        self._install_metric_sync()

    def _install_metric_sync(self) -> None:
        """torchmetrics objects are updated on the last stage: their ``compute()`` must see the states of the last
        stage's data-parallel replicas on every rank (see
        :class:`~lightning_bfpp.lightning.log_relay.PipelineMetricSync`)."""
        sync = PipelineMetricSync(
            self.dp_group, self.pp_group, self.pipeline_parallel_size - 1, self.is_last_stage_rank
        )
        install_metric_sync(self.lightning_module, sync)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluation_step("validation_step", args, kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluation_step("test_step", args, kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluation_step("predict_step", args, kwargs)

    def _evaluation_step(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self._explain_lost_rank(f"a {hook.replace('_', ' ')}"):
            return self._run_evaluation_step(hook, args, kwargs)

    def _run_evaluation_step(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Runs the batch forward through the pipeline; on the last stage, calls the module's ``hook`` for each
        micro-batch with ``self(...)`` answering the pipeline's output, and relays its logs and merged results to
        every rank of the pipeline (so every rank returns, logs and hands callbacks the same)."""
        module = self.lightning_module
        batch, rest = (args[0], args[1:]) if args else (kwargs.pop("batch"), ())
        size = batch_size_of(batch) or 1
        # the largest micro-batch count <= M that splits this batch evenly (a last, smaller batch may need fewer)
        m_eval = max(d for d in range(1, min(self.micro_batches, size) + 1) if size % d == 0)
        micro_batches = split_batch(batch, m_eval)
        recorder, results = LogRecorder(), []
        step = getattr(type(module), hook)

        def last(m: int, outputs: StageIO) -> None:
            module.__dict__["forward"] = lambda *a, **k: outputs
            try:
                with recorder.capture(module):
                    results.append(step(module, micro_batches[m], *rest, **kwargs))
            finally:
                module.__dict__.pop("forward", None)

        executor = self._executor(m_eval, forward_only=True)
        plugin = self.precision_plugin
        context = {"test_step": plugin.test_step_context, "predict_step": plugin.predict_step_context}.get(
            hook, plugin.val_step_context
        )
        with torch.no_grad(), context():
            executor.run(self._stage_forward(micro_batches), last)
        return self._relay_from_last_stage(merge_outputs(results), recorder)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        # Over every rank: `reduce` sums over the data-parallel replicas only, while callers (ModelCheckpoint's top-k
        # test, file_exists) compare the sum with the world size.
        if refuse_in_pipeline_hook("trainer.strategy.reduce_boolean_decision()"):
            return decision
        flag = torch.tensor(int(decision), device=self.root_device)
        flag = sync_ddp_if_available(flag, dist.group.WORLD, reduce_op=ReduceOp.SUM)
        return bool(flag == self.world_size) if all else bool(flag)

    # ------------------------------------------------------------------------------------------ collectives
    @override
    def barrier(self, name: str | None = None) -> None:
        if not distributed_is_initialized() or refuse_in_pipeline_hook("trainer.strategy.barrier()"):
            return
        with self._explain_lost_rank(f"a barrier{f' ({name})' if name else ''}"):
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.root_device.index])
            else:
                dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not distributed_is_initialized() or refuse_in_pipeline_hook("trainer.strategy.broadcast()"):
            return obj
        box = [obj]
        with self._explain_lost_rank("a broadcast"):
            dist.broadcast_object_list(box, src)
        return box[0]

    @override
    def reduce(
        self, tensor: Tensor | Any, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean"
    ) -> Tensor | Any:
        """Reduces over the data-parallel replicas by default: the ranks of one pipeline hold the same values."""
        if isinstance(tensor, Tensor) and not refuse_in_pipeline_hook("trainer.strategy.reduce()"):
            return sync_ddp_if_available(tensor, group if group is not None else self.dp_group, reduce_op=reduce_op)
        return tensor

    @override
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        if refuse_in_pipeline_hook("self.all_gather() / trainer.strategy.all_gather()"):
            return torch.stack([tensor] * (self.world_size if group is None else dist.get_world_size(group)))
        return super().all_gather(tensor, group, sync_grads)

    @override
    def teardown(self) -> None:
        self._executors.clear()
        if self._weight_gradient_batcher is not None:
            self._weight_gradient_batcher.remove()
            self._weight_gradient_batcher = None
        self._data_parallel = None
        super().teardown()

    @override
    def on_exception(self, exception: BaseException) -> None:
        self.failed = True
        super().on_exception(exception)

    def release_process_groups(self) -> None:
        """Drops this strategy's references to its process groups (at interpreter exit, before they are
        destroyed: see :mod:`lightning_bfpp.run.process_groups`)."""
        self._executors.clear()
        self._data_parallel = None
        self._tied = None
        self._step_relay = None
        self.pp_group = self.dp_group = None
        restore_clip_grad_by_norm(self.precision_plugin)  # its closure holds the groups
        if self.model is not None:
            install_metric_sync(self.lightning_module, None)


BFPPStrategy.__doc__ = f"{BFPPStrategy.__doc__.rstrip()}\n{arguments_docstring(indent=' ' * 12)}\n"
