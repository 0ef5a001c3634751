"""The private Lightning (and torchmetrics) names the plugin relies on, each checked against the installed version,
and a check that no module but ``lightning_bfpp.lightning.internals`` uses one."""

from __future__ import annotations

import ast
import re
import socket
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.callbacks import ModelSummary as ModelSummaryCallback
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bfpp import BFPPStrategy
from lightning_bfpp.lightning import internals

PACKAGE = Path(internals.__file__).parent.parent
LIBRARIES = ("lightning", "lightning_fabric", "pytorch_lightning", "lightning_utilities", "torchmetrics")

# Our own private names that a Lightning or torchmetrics class also defines, by module: none of these is accessed on
# a Lightning or torchmetrics object.
OWN_NAMES = {
    "lightning/strategy.py": {
        "_process_group_backend",  # BFPPStrategy's own (DDPStrategy, not a base class, has one of the same name)
        "_training_step",  # BFPPStrategy method
    },
    "lightning/log_relay.py": {"_error", "_module", "_metrics"},  # LogRecorder's fields; a module-level helper
    "run/tied.py": {"_module"},
    "run/sharding.py": {"_reductions", "_store"},
    "run/p2p.py": {"_start"},
    "run/nccl_order_link.py": {"_start"},  # NcclOrderLink overrides PeerLink._start
    "plan/search.py": {"_schedule"},
    "plan/simulate.py": {"_mode"},
}


def _library_private_names() -> set[str]:
    """Every ``self._name`` that Lightning or torchmetrics assigns, and every private function, method or class it
    defines."""
    names: set[str] = set()
    for root in (Path(lightning.__file__).parent, Path(torchmetrics.__file__).parent):
        for source in root.rglob("*.py"):
            text = source.read_text(errors="ignore")
            names.update(re.findall(r"\bself\.(_[A-Za-z]\w*)\s*(?::[^=\n]+)?=(?!=)", text))
            names.update(re.findall(r"^\s*(?:def|class) (_[A-Za-z]\w*)\b", text, re.M))
    return {n for n in names if not n.startswith("__")}


def _private_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, name)`` of every ``x._name``, every string ``"_name"`` (``getattr(x, "_name")``, a ``__dict__`` key)
    and every method ``def _name`` in ``tree``."""
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            uses.append((node.lineno, node.attr))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"_\w+", node.value):
            uses.append((node.lineno, node.value))
        elif isinstance(node, ast.ClassDef):
            uses += [(f.lineno, f.name) for f in node.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]
    return [(line, name) for line, name in uses if name.startswith("_") and not name.startswith("__")]


def _private_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, name)`` of every import of a private name or module of Lightning or torchmetrics in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
            for alias in node.names:
                path = f"{node.module}.{alias.name}"
                if any(part.startswith("_") for part in path.split(".")):
                    found.append((node.lineno, path))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in LIBRARIES and any(part.startswith("_") for part in parts):
                    found.append((node.lineno, alias.name))
    return found


def test_no_private_lightning_name_outside_internals() -> None:
    library = _library_private_names()
    assert {"_skip_backward", "_should_accumulate", "_optimizer", "_update_count"} <= library  # the scan finds them
    offenders = []
    for source in sorted(PACKAGE.rglob("*.py")):
        if source.relative_to(PACKAGE).as_posix() == "lightning/internals.py":
            continue
        tree = ast.parse(source.read_text())
        relative = source.relative_to(PACKAGE).as_posix()
        allowed = OWN_NAMES.get(relative, set())
        offenders += [f"{relative}:{line}: import {name}" for line, name in _private_imports(tree)]
        offenders += [
            f"{relative}:{line}: {name}"
            for line, name in _private_uses(tree)
            if name in library and name not in allowed
        ]
    assert not offenders, (
        "private Lightning/torchmetrics names used outside lightning_bfpp/lightning/internals.py (move them there, "
        "with a test here; or, for our own name that happens to match, add it to OWN_NAMES):\n" + "\n".join(offenders)
    )


# ------------------------------------------------------------------------------------------------- fit loop
class _Recorder(pl.Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self.calls.append(f"callback.on_before_backward({loss.item():g})")

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.calls.append("callback.on_after_backward")


class _SelfBackwardModule(pl.LightningModule):
    """Runs its own backward in ``training_step`` (as the pipelined step does): +1 on the weight's gradient."""

    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.metric = torchmetrics.MeanMetric()
        self.calls = calls
        self.accumulates: list[bool] = []
        self.grads_at_step: list[float] = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        internals.skip_loop_backward(self.trainer)  # before the loop builds the batch's closure

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.accumulates.append(internals.accumulates_this_batch(self.trainer))
        if batch_idx % 2 == 0:
            self.weight.grad = None  # the window's first batch: the step zeroes the gradients itself
        loss = self.weight * 1.0
        loss.backward()
        internals.call_hook(self.trainer, "on_before_backward", loss.detach() + 7)
        internals.call_hook(self.trainer, "on_after_backward")
        internals.set_metric_forward_value(self.metric, torch.tensor(batch_idx + 0.5))
        self.log("metric", self.metric, on_step=True, on_epoch=False)  # logs the Metric's last forward value
        return loss

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.calls.append(f"module.on_before_backward({loss.item():g})")

    def on_after_backward(self) -> None:
        self.calls.append("module.on_after_backward")

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        assert self.weight.grad is not None
        self.grads_at_step.append(self.weight.grad.item())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(5, 1)), batch_size=1)


def _trainer(**kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_fit_loop_skips_backward_and_zero_grad_accumulates_and_calls_hooks() -> None:
    """One fit of 5 batches with accumulate_grad_batches=2, each ``training_step`` running its own backward and logging
    a Metric's forward value set as the log relay sets it."""
    recorder = _Recorder()
    module = _SelfBackwardModule(recorder.calls)
    trainer = _trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[recorder])
    trainer.fit(module)
    # Neither the closure's zero_grad nor its backward ran: 2 own backwards per window (Lightning's would make 3),
    # and the epoch's last batch steps alone.
    assert module.grads_at_step == [2.0, 2.0, 1.0]
    assert module.accumulates == [True, False, True, False, False]  # the epoch's last batch steps
    # the callbacks' hook, then the module's, with the given arguments; nothing from Lightning's (skipped) backward
    assert (
        recorder.calls
        == [
            "callback.on_before_backward(7)",
            "module.on_before_backward(7)",
            "callback.on_after_backward",
            "module.on_after_backward",
        ]
        * 5
    )
    assert trainer.callback_metrics["metric"].item() == 4.5


def test_signal_handlers_are_reported_and_a_stop_ends_the_fit_after_the_batch() -> None:
    """``on_signal_handlers`` reports the handler Lightning replaced for SIGTERM as the run starts, then that it was
    put back; ``stop_after_this_batch`` in batch 1 stops the fit with ``SIGTERMException`` after that batch, running
    the callbacks' ``on_exception`` (where ``ModelCheckpoint(save_on_exception=True)`` saves)."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    seen: list[Any] = []

    class StopAtBatchOne(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            seen.append(("handler", signal.getsignal(signal.SIGTERM)))
            if trainer.global_step == 1:
                internals.stop_after_this_batch(trainer)

        def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
            seen.append(("exception", type(exception), trainer.global_step))

    before = signal.getsignal(signal.SIGTERM)
    trainer = _trainer(max_steps=4, callbacks=[StopAtBatchOne()])
    internals.on_signal_handlers(
        trainer, lambda replaced: seen.append(("installed", replaced)), lambda: seen.append("restored")
    )
    with pytest.raises(SIGTERMException):
        trainer.fit(_SelfBackwardModule([]))
    assert seen[0] == ("installed", {int(signal.SIGTERM): before})
    assert seen[1][0] == "handler" and seen[1][1] is not before  # Lightning's, during the run
    assert seen[-2:] == [("exception", SIGTERMException, 2), "restored"]  # stopped after batch 1 (2 steps made)
    assert signal.getsignal(signal.SIGTERM) is before


def test_attached_trainer() -> None:
    module = pl.LightningModule()
    assert internals.attached_trainer(module) is None  # where `module.trainer` raises
    trainer = _trainer()
    module.trainer = trainer
    assert internals.attached_trainer(module) is trainer


# -------------------------------------------------------------------------------------- launch and processes
def test_launcher_re_runs_the_script() -> None:
    """The accelerator connector calls the strategy's ``_configure_launcher``: the mixin's launcher is Lightning's."""
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=BFPPStrategy(), logger=False)
    assert isinstance(trainer.strategy.launcher, internals.SubprocessScriptLauncher)
    assert not trainer.strategy.launcher.is_interactive_compatible


def test_process_group_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert internals.default_process_group_backend(torch.device("cpu")) == "gloo"
    assert not internals.distributed_is_initialized()
    value = torch.tensor([3.0])
    assert internals.sync_ddp_if_available(value, None, reduce_op="mean") is value  # no process group: unchanged
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    environment = LightningEnvironment()
    environment.set_world_size(1)
    environment.set_global_rank(0)
    internals.init_dist_connection(environment, "gloo", timeout=torch.distributed.default_pg_timeout)
    try:
        assert internals.distributed_is_initialized()
        assert torch.distributed.get_backend() == "gloo"
        summed = internals.sync_ddp_if_available(torch.tensor([3.0]), None, reduce_op="sum")
        assert summed.tolist() == [3.0]
    finally:
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------- precision, optimizer
def test_clip_gradients_by_norm_calls_the_replacement() -> None:
    plugin = Precision()
    optimizer = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    seen: list[tuple[Any, float]] = []
    internals.replace_clip_grad_by_norm(plugin, lambda p, opt, value: seen.append((opt, value)))
    plugin.clip_gradients(optimizer, 0.5, GradClipAlgorithmType.NORM)
    assert seen == [(optimizer, 0.5)]
    internals.restore_clip_grad_by_norm(plugin)
    assert plugin.clip_grad_by_norm.__func__ is Precision.clip_grad_by_norm  # type: ignore[attr-defined]


def test_unwrap_optimizer() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    assert internals.unwrap_optimizer(LightningOptimizer(optimizer)) is optimizer
    assert internals.unwrap_optimizer(optimizer) is optimizer


# ------------------------------------------------------------------------------------------------------ summary
class _Columns(internals.SummaryWithColumns):
    def extra_columns(self, rows: int) -> list[tuple[str, list[str]]]:
        return [("Extra", [f"x{i}" for i in range(rows)])]


class _Small(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(2, 3)
        self.second = nn.Sequential(nn.Linear(3, 1))


def test_model_summary_callback_uses_the_installed_factory_and_its_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _Small()
    callback = ModelSummaryCallback(max_depth=2)
    assert internals.summary_max_depth(callback) == 2
    built: list[_Columns] = []

    def factory(cb: ModelSummaryCallback, trainer: pl.Trainer, pl_module: pl.LightningModule) -> _Columns:
        built.append(_Columns(pl_module, max_depth=internals.summary_max_depth(cb)))
        return built[-1]

    internals.install_summary_factory(callback, factory)
    printed: list[list[tuple[str, list[str]]]] = []
    monkeypatch.setattr(callback, "summarize", lambda summary_data, *args, **kwargs: printed.append(summary_data))
    callback.on_fit_start(_trainer(), module)
    summary = built[0]
    assert summary.model is module and summary.max_depth == 2
    assert [layer.layer_type for layer in summary.layer_summaries()] == ["Linear", "Sequential", "Linear"]
    columns = [name for name, _ in printed[0]]
    assert columns[columns.index("Params") + 1] == "Extra"  # on_fit_start prints _get_summary_data()
    assert dict(printed[0])["Extra"] == ["x0", "x1", "x2"]


# --------------------------------------------------------------------------------------------------- torchmetrics
def test_metric_update_count_and_forward_value() -> None:
    metric = torchmetrics.MeanMetric()
    assert internals.metric_update_count(metric) == 0
    assert metric(torch.tensor([1.0, 3.0])).item() == 2.0
    assert internals.metric_forward_value(metric).item() == 2.0  # type: ignore[union-attr]
    metric.update(torch.tensor([5.0]))
    assert internals.metric_update_count(metric) == 2
    assert metric.compute().item() == 3.0  # cached until the count changes
    metric.mean_value += 3.0  # as if the last stage's state had arrived
    internals.set_metric_update_count(metric, 3)
    assert internals.metric_update_count(metric) == 3
    assert metric.compute().item() == 4.0  # the cached result was dropped
    internals.set_metric_forward_value(metric, torch.tensor(9.0))
    assert internals.metric_forward_value(metric).item() == 9.0  # type: ignore[union-attr]


def test_log_dict_goes_through_the_instances_log() -> None:
    """The log relay records ``self.log`` by setting ``log`` on the module instance; ``log_dict`` must reach it."""
    module = pl.LightningModule()
    seen: list[tuple[str, Any]] = []
    module.__dict__["log"] = lambda name, value, *args, **kwargs: seen.append((name, value))
    module.log_dict({"a": 1.0, "b": torch.tensor(2.0)})
    assert [name for name, _ in seen] == ["a", "b"]


def test_restricted_classmethod_is_a_classmethod_refused_on_instances() -> None:
    """PipelineModule.load_from_checkpoint keeps LightningModule's guard: called on an instance, it raises."""

    class Loader:
        @internals.restricted_classmethod
        def load(cls, value: int) -> tuple[type, int]:
            return cls, value

    class Child(Loader):
        pass

    assert Child.load(3) == (Child, 3)
    with pytest.raises(TypeError, match="cannot be called on an instance"):
        Child().load(3)
