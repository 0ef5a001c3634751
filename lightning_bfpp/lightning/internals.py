"""Every private name of Lightning (and torchmetrics) that lightning-bfpp uses, in one place.

Each function or constant below says why the plugin needs it and what Lightning 2.6 does there;
``tests/test_lightning_internals.py`` fails if Lightning renames one or changes the behaviour relied on, and a test
there checks that no other module of the package uses a private Lightning name. To move to another Lightning version,
change this module.

The plugin also sets attributes of its own on the user's LightningModule, in the instance's ``__dict__`` (so that
``nn.Module.__setattr__`` does not register them): ``_bfpp_split`` (partition and layer names), ``_bfpp_sharded``
(the FSDP2-sharded stages), ``_bfpp_ties`` and ``_bfpp_tied_aliases`` (tied parameters), ``_bfpp_whole_model`` (the
sizes for the summary). Lightning defines none of these names; the test of this module checks that no name the
package uses is one of Lightning's private names.

Two public methods are replaced on instances, not private names: ``log`` on the module while the log relay records a
hook's calls (``log_dict`` reaches it, tested), and ``forward`` on the module during a pipelined evaluation step.
"""

from __future__ import annotations

import signal
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.pytorch.callbacks import ModelSummary as ModelSummaryCallback
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
from lightning.pytorch.utilities.model_summary import ModelSummary
from torch import nn
from typing_extensions import override

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.utilities.model_summary.model_summary import LayerSummary
    from torch import Tensor
    from torchmetrics import Metric

__all__ = [
    "SubprocessLauncherMixin",
    "SummaryWithColumns",
    "accumulates_this_batch",
    "attached_trainer",
    "call_hook",
    "default_process_group_backend",
    "distributed_is_initialized",
    "init_dist_connection",
    "install_summary_factory",
    "metric_forward_value",
    "metric_update_count",
    "on_signal_handlers",
    "replace_clip_grad_by_norm",
    "restore_clip_grad_by_norm",
    "restricted_classmethod",
    "set_metric_forward_value",
    "set_metric_update_count",
    "skip_loop_backward",
    "stop_after_this_batch",
    "summary_max_depth",
    "sync_ddp_if_available",
    "unwrap_optimizer",
]

# ------------------------------------------------------------------------------------------ process group
# Lightning's own DDP/FSDP strategies set up the default process group with these; a custom ParallelStrategy has no
# public equivalent. `_init_dist_connection(environment, backend, global_rank=None, world_size=None, **kwargs)` reads
# MASTER_ADDR/PORT from the cluster environment and passes kwargs (timeout, device_id) to init_process_group.
init_dist_connection = _init_dist_connection
# The backend Lightning picks for a device ("gloo" on CPU, torch's default map otherwise).
default_process_group_backend = _get_default_process_group_backend_for_device
# `_sync_ddp_if_available(tensor, group, reduce_op)`: Lightning's reduce with "mean" support; returns the tensor
# unchanged when no process group exists. DDPStrategy.reduce uses it; the plugin's reduce must reduce the same way.
sync_ddp_if_available = _sync_ddp_if_available
# True when torch.distributed is available and initialized (guards barrier/broadcast before set-up).
distributed_is_initialized = _distributed_is_initialized


# ------------------------------------------------------------------------------------------------ launcher
class SubprocessLauncherMixin:
    """Starts the local ranks as Lightning's DDP does: ``Strategy._configure_launcher`` is the hook the accelerator
    connector calls once the strategy is chosen, and ``_SubprocessScriptLauncher`` re-runs the script for each local
    rank unless the cluster environment creates the processes (SLURM, torchelastic). ``ParallelStrategy`` sets no
    launcher of its own."""

    cluster_environment: Any
    num_processes: int
    num_nodes: int

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)


SubprocessScriptLauncher = _SubprocessScriptLauncher


# ------------------------------------------------------------------------------------------------ fit loop
def skip_loop_backward(trainer: pl.Trainer) -> None:
    """Makes automatic optimization skip both the closure's ``zero_grad`` and its ``backward`` for the current batch.

    The pipelined ``training_step`` runs every micro-batch's forward and backward itself; the closure would otherwise
    zero those gradients and call backward on the returned loss. ``FitLoop._skip_backward`` (a property writing
    ``_AutomaticOptimization._skip_backward``) turns off both: the closure then builds neither function. The closure
    is built before ``training_step`` runs, so call this earlier (``on_train_batch_start``); Lightning never clears
    it (``StochasticWeightAveraging`` sets and clears it the same way)."""
    trainer.fit_loop._skip_backward = True


def accumulates_this_batch(trainer: pl.Trainer) -> bool:
    """Whether the optimizer will not step after this batch (``accumulate_grad_batches`` > 1, not the window's last
    batch), decided as Lightning's loop decides it (``FitLoop._should_accumulate()``; the epoch's last batch steps)."""
    return trainer.fit_loop._should_accumulate()


def call_hook(trainer: pl.Trainer, hook: str, *args: Any) -> None:
    """Calls ``hook`` on every callback, then on the LightningModule, as the loop does (profiled, with
    ``current_fx_name`` set so ``self.log`` works there). Used for ``on_before_backward``/``on_after_backward``, which
    Lightning's backward would call and the skipped backward does not."""
    call._call_callback_hooks(trainer, hook, *args)
    call._call_lightning_module_hook(trainer, hook, *args)


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The Trainer the module is attached to, or None. ``LightningModule.trainer`` raises when there is none
    (``configure_model`` also runs without one); ``_trainer`` holds it or None."""
    return module._trainer


# `LightningModule.load_from_checkpoint` is decorated with it: a classmethod that raises when called on an instance
# (whose result would be dropped). PipelineModule's override keeps that behaviour.
restricted_classmethod = _restricted_classmethod


# ------------------------------------------------------------------------------------------------- signals
def on_signal_handlers(
    trainer: pl.Trainer, installed: Callable[[dict[int, Any]], None], restored: Callable[[], None]
) -> None:
    """Calls ``installed(replaced)`` right after Lightning has installed its signal handlers for a run, ``replaced``
    mapping each signal whose handler Lightning changed to the handler it replaced; calls ``restored()`` once Lightning
    has put those back.

    ``Trainer._run`` calls ``trainer._signal_connector.register_signal_handlers()`` after the strategy's ``setup``
    and the checkpoint restore, right before the run's loop; it handles SIGTERM (a handler that runs a
    ``dist.broadcast`` from rank 0 inside the handler, then sets ``received_sigterm``, chaining a handler of before)
    and, under SLURM auto-requeue, the requeue signal (saves a checkpoint and runs ``scontrol requeue`` inside the
    handler). ``Trainer._teardown`` calls ``_signal_connector.teardown()``, which restores every handler of before.
    Both are wrapped on the connector instance (again at each run, without nesting)."""
    connector = trainer._signal_connector
    connector_class = type(connector)

    def register() -> None:
        before = _signal_handlers()
        connector_class.register_signal_handlers(connector)
        after = _signal_handlers()
        installed({signum: handler for signum, handler in before.items() if after[signum] is not handler})

    def teardown() -> None:
        connector_class.teardown(connector)
        restored()

    connector.register_signal_handlers = register  # type: ignore[method-assign]
    connector.teardown = teardown  # type: ignore[method-assign]


def _signal_handlers() -> dict[int, Any]:
    catchable = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
    return {int(signum): signal.getsignal(signum) for signum in catchable}


def stop_after_this_batch(trainer: pl.Trainer) -> None:
    """Makes the loops stop as Lightning stops on SIGTERM: ``trainer.received_sigterm`` (a property reading
    ``_signal_connector.received_sigterm``) makes the training epoch loop raise ``SIGTERMException`` at the end of
    the current batch's ``advance`` (unless training is done), and the fit and evaluation loops at their next check;
    the exception runs the callbacks' ``on_exception`` (``ModelCheckpoint(save_on_exception=True)`` saves there)."""
    trainer._signal_connector.received_sigterm = True


# ----------------------------------------------------------------------------------------- precision plugin
def replace_clip_grad_by_norm(plugin: Precision, clip: Callable[[Precision, Any, float], None]) -> None:
    """Makes ``plugin.clip_gradients(..., "norm")`` call ``clip(plugin, optimizer, clip_val)``.

    Lightning's ``Precision.clip_gradients`` (after unscaling under a GradScaler) calls ``self.clip_grad_by_norm``,
    which sees this rank's parameters only; the pipeline's norm is reduced over all stages. Set on the instance, so
    the user's precision plugin class keeps its own behaviour otherwise."""
    plugin.clip_grad_by_norm = types.MethodType(clip, plugin)  # type: ignore[method-assign]


def restore_clip_grad_by_norm(plugin: Precision) -> None:
    """Undoes :func:`replace_clip_grad_by_norm` (its closure holds process groups)."""
    plugin.__dict__.pop("clip_grad_by_norm", None)


# ---------------------------------------------------------------------------------------------- optimizers
def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a ``LightningOptimizer`` (its ``_optimizer``; ``strategy.optimizers`` holds the
    plain ones, hooks receive the wrapper), or ``optimizer`` itself."""
    return getattr(optimizer, "_optimizer", optimizer)


# ------------------------------------------------------------------------------------------------ summary
def install_summary_factory(
    callback: ModelSummaryCallback, factory: Callable[[ModelSummaryCallback, pl.Trainer, pl.LightningModule], Any]
) -> None:
    """Makes a ``ModelSummary`` callback (and ``RichModelSummary``) build its summary with ``factory(callback, trainer,
    pl_module)``: its ``on_fit_start`` calls ``self._summary(trainer, pl_module)`` (DeepSpeed's summary is chosen
    there the same way), then reads ``_get_summary_data()`` and the totals of what it returns."""
    callback._summary = types.MethodType(factory, callback)  # type: ignore[method-assign]


def summary_max_depth(callback: ModelSummaryCallback) -> int:
    """The ``max_depth`` a ``ModelSummary`` callback was given (kept as ``_max_depth``)."""
    return callback._max_depth


class SummaryWithColumns(ModelSummary):
    """Lightning's ``ModelSummary`` (``lightning.pytorch.utilities.model_summary``) with columns added after
    "Params" and public access to what its subclasses need: the summarized module, the depth and the layer rows.

    The table's columns come from ``ModelSummary._get_summary_data()`` (used by ``__str__`` and by the callbacks);
    the module and depth are kept as ``_model`` and ``_max_depth``, the rows ``summarize()`` built as
    ``_layer_summary``."""

    @property
    def model(self) -> nn.Module:
        """The summarized module."""
        return self._model

    @property
    def max_depth(self) -> int:
        """As for Lightning's ``ModelSummary``: ``-1`` every module, ``0`` none, ``n`` down to depth ``n``."""
        return self._max_depth

    def layer_summaries(self) -> list[LayerSummary]:
        """The rows of the table, as :meth:`summarize` returned them."""
        return list(self._layer_summary.values())

    def extra_columns(self, rows: int) -> list[tuple[str, list[str]]]:
        """Columns inserted after "Params", each ``rows`` long; none by default."""
        return []

    @override
    def _get_summary_data(self) -> list[tuple[str, list[str]]]:
        arrays = super()._get_summary_data()
        extra = self.extra_columns(len(arrays[0][1]))  # one row more than the layers when "other params" is added
        after = [name for name, _ in arrays].index("Params") + 1
        return [*arrays[:after], *extra, *arrays[after:]]


# ------------------------------------------------------------------------------------ torchmetrics (not Lightning)
# The log relay replays a Metric logged on the last stage on the other ranks of its pipeline; torchmetrics has no
# public API for a Metric's update count or its last forward value, and Lightning's logging reads both.
def metric_update_count(metric: Metric) -> int:
    """How many times ``update`` (or ``forward``) ran since the last reset (``Metric._update_count``)."""
    return metric._update_count


def set_metric_update_count(metric: Metric, count: int) -> None:
    """Sets the update count and drops the cached ``compute()`` result (``_computed``), so the next ``compute()``
    runs (it warns when the count is 0, and Lightning skips a Metric whose count is 0 at epoch end)."""
    if metric._update_count != count:
        metric._update_count = count
        metric._computed = None


def metric_forward_value(metric: Metric) -> Tensor | None:
    """The value the last ``forward`` returned (``_forward_cache``): what ``self.log(name, metric)`` logs per step."""
    return metric._forward_cache


def set_metric_forward_value(metric: Metric, value: Tensor | None) -> None:
    """Sets the value that ``self.log(name, metric)`` logs for this step (Lightning's result collection reads
    ``metric._forward_cache``)."""
    metric._forward_cache = value
