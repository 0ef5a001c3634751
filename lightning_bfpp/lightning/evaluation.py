"""The last stage's results and logs on every rank for :class:`~lightning_bfpp.BFPPStrategy`: the pipelined
evaluation steps, the relay of what the last stage returns and logs, and the metric synchronisation."""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor
from typing_extensions import override

from lightning_bfpp.lightning.log_relay import (
    LogRecorder,
    PipelineMetricSync,
    calls_on_host,
    install_metric_sync,
    replay,
)
from lightning_bfpp.lightning.step_relay import RelayedStep, StepRelay
from lightning_bfpp.run.collectives import relay
from lightning_bfpp.run.executor import StageIO
from lightning_bfpp.run.microbatch import batch_size_of, merge_outputs, split_batch


class PipelinedEvaluation:
    """Strategy methods for evaluation and the last stage's relay; mixed into ``BFPPStrategy`` (it uses the
    strategy's ``lightning_module``, ``pipeline``, ``precision_plugin``, ``pp_group``, ``dp_group``, ``root_device``,
    ``micro_batches``, ``is_last_stage_rank``, ``pipeline_parallel_size`` and ``_explain_lost_rank``)."""

    _step_relay: StepRelay | None = None

    @override
    def on_train_start(self) -> None:
        super().on_train_start()  # type: ignore[misc]
        self._install_metric_sync()

    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()  # type: ignore[misc]
        self._install_metric_sync()

    @override
    def on_test_start(self) -> None:
        super().on_test_start()  # type: ignore[misc]
        self._install_metric_sync()

    def _install_metric_sync(self) -> None:
        """torchmetrics objects are updated on the last stage: their ``compute()`` must see the states of the last
        stage's data-parallel replicas on every rank (see
        :class:`~lightning_bfpp.lightning.log_relay.PipelineMetricSync`)."""
        s: Any = self
        sync = PipelineMetricSync(s.dp_group, s.pp_group, s.pipeline_parallel_size - 1, s.is_last_stage_rank)
        install_metric_sync(s.lightning_module, sync)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._pipelined_evaluation_step("validation_step", args, kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._pipelined_evaluation_step("test_step", args, kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._pipelined_evaluation_step("predict_step", args, kwargs)

    def _pipelined_evaluation_step(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self._explain_lost_rank(f"a {hook.replace('_', ' ')}"):  # type: ignore[attr-defined]
            return self._run_evaluation_step(hook, args, kwargs)

    def _run_evaluation_step(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Runs the batch forward through the pipeline; on the last stage, calls the module's ``hook`` for each
        micro-batch with ``self(...)`` answering the pipeline's output, and relays its logs and merged results to
        every rank of the pipeline (so every rank returns, logs and hands callbacks the same)."""
        s: Any = self
        module = s.lightning_module
        batch, rest = (args[0], args[1:]) if args else (kwargs.pop("batch"), ())
        size = batch_size_of(batch) or 1
        # the largest micro-batch count <= M that splits this batch evenly (a last, smaller batch may need fewer)
        m_eval = max(d for d in range(1, min(s.micro_batches, size) + 1) if size % d == 0)
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

        plugin = s.precision_plugin
        context = {"test_step": plugin.test_step_context, "predict_step": plugin.predict_step_context}.get(
            hook, plugin.val_step_context
        )
        with context():
            s.pipeline.run_forward(micro_batches, last)
        return self._relay_from_last_stage(merge_outputs(results), recorder)

    def _start_relay(self, loss: Tensor | None, recorder: LogRecorder) -> RelayedStep:
        """Starts handing the training step's batch loss and logged calls from the last stage to every rank of the
        pipeline: while the logged names and options stay the same, one tensor broadcast per step and nothing read on
        the host but its flag (see :mod:`~lightning_bfpp.lightning.step_relay`)."""
        s: Any = self
        if self._step_relay is None or self._step_relay.group is not s.pp_group:
            self._step_relay = StepRelay(s.pp_group, s.pipeline_parallel_size - 1, s.root_device)
        last = s.is_last_stage_rank
        assert not last or loss is not None
        return self._step_relay.start(loss if last else None, recorder.calls() if last else None)

    def _relay_from_last_stage(self, result: Any, recorder: LogRecorder) -> Any:
        """Sends ``result`` (computed on the last stage; ignored elsewhere) and the calls ``recorder`` captured there to
        every rank of the pipeline, replays the calls on every rank, and returns the result on this rank's device."""
        s: Any = self
        payload = None
        if s.is_last_stage_rank:
            payload = (move_data_to_device(result, "cpu"), calls_on_host(recorder.calls()))
        result, calls = relay(payload, s.pp_group, s.pipeline_parallel_size - 1)
        replay(s.lightning_module, calls, s.root_device)
        return move_data_to_device(result, s.root_device)


__all__ = ["PipelinedEvaluation"]
