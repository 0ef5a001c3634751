"""Which of Lightning's stock callbacks run under ``BFPPStrategy``, and the refusal of the ones that cannot; the
refusal of optimizers whose step cannot run in a pipeline.

Every class that ``lightning.pytorch.callbacks`` exports is listed in :data:`CALLBACK_SUPPORT`. A refused one (or a
user's subclass of it) stops the run on every rank before the process group exists, with a message that names it
and says what to use instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lightning.pytorch import callbacks
from lightning.pytorch.callbacks import Callback
from torch.optim import LBFGS, Optimizer


@dataclass(frozen=True)
class Support:
    """How a stock callback runs under ``BFPPStrategy``: ``refused`` is None where it works, else why it cannot and
    what to use instead."""

    note: str
    refused: str | None = None


_WORKS = Support("works")
_SAME_AS_ONE_PROCESS = Support("works, trains as on one process")
_FINETUNING = Support(
    "refused",
    "freezes and unfreezes layers and adds parameter groups to the optimizer during training, which the pipeline's "
    "per-stage gradient reduction and sharded optimizers do not follow. Give the layers their own learning rate "
    "instead: parameter groups in configure_optimizers, with a learning-rate scheduler (lr 0 while frozen)",
)
_AVERAGING = Support(
    "refused",
    "keeps a copy of the whole module and swaps it in for validation and checkpoints (batch-norm statistics by "
    "forwards outside the pipeline). Average the weights of saved checkpoints after training instead "
    "(torch.optim.swa_utils on one process)",
)

CALLBACK_SUPPORT: dict[str, Support] = {
    "Callback": _WORKS,
    "Checkpoint": _WORKS,
    "ModelCheckpoint": _SAME_AS_ONE_PROCESS,
    "EarlyStopping": _SAME_AS_ONE_PROCESS,
    "GradientAccumulationScheduler": _SAME_AS_ONE_PROCESS,
    "SpikeDetection": _SAME_AS_ONE_PROCESS,
    "Timer": _WORKS,
    "LambdaCallback": _WORKS,
    "LearningRateMonitor": _WORKS,
    "DeviceStatsMonitor": _WORKS,
    "ThroughputMonitor": _WORKS,
    "BasePredictionWriter": _WORKS,
    "ModelSummary": _WORKS,
    "RichModelSummary": _WORKS,
    "ProgressBar": _WORKS,
    "TQDMProgressBar": _WORKS,
    "RichProgressBar": _WORKS,
    "BaseFinetuning": _FINETUNING,
    "BackboneFinetuning": _FINETUNING,
    "StochasticWeightAveraging": _AVERAGING,
    "WeightAveraging": _AVERAGING,
    "EMAWeightAveraging": _AVERAGING,
    "ModelPruning": Support(
        "refused",
        "prunes by thresholds over the parameters one rank holds, so a pipelined run would prune differently from "
        "one process. Prune the trained model on one process (strategy='auto') from its checkpoint",
    ),
    "LearningRateFinder": Support(
        "refused",
        "runs trial steps and restores the model from a temporary checkpoint (Tuner.lr_find adds it too). Find "
        "the learning rate on one process (strategy='auto', e.g. with a smaller model) and set it",
    ),
    "BatchSizeFinder": Support(
        "refused",
        "changes the batch size between trial runs, and each must be a multiple of micro_batches. Find the batch "
        "size on one process (strategy='auto') or by trying sizes, and set it",
    ),
    "OnExceptionCheckpoint": Support(
        "refused",
        "saves a sharded checkpoint, a collective of every rank, when one rank raises, while the other ranks wait "
        "in the pipeline: the job would hang until the timeout. Save checkpoints regularly with "
        "ModelCheckpoint(every_n_train_steps=..., save_last=True) and resume with ckpt_path='last'",
    ),
}

# The refused classes, most derived first, so that a subclass is named with its closest stock parent.
_REFUSED: list[tuple[type[Callback], str]] = sorted(
    ((getattr(callbacks, name), name) for name, support in CALLBACK_SUPPORT.items() if support.refused is not None),
    key=lambda item: -len(item[0].__mro__),
)


def refusal(callback: Callback) -> str | None:
    """The error message for ``callback`` under ``BFPPStrategy``, or None if it may run."""
    for cls, name in _REFUSED:
        if isinstance(callback, cls):
            reason = CALLBACK_SUPPORT[name].refused
            own = type(callback).__name__
            label = own if own == name else f"{own} (a {name})"
            return f"The callback {label} is not supported by BFPPStrategy: it {reason}."
    return None


def check_callbacks(trainer_callbacks: Iterable[Callback]) -> None:
    """Raises ``ValueError`` naming the first refused callback and what to use instead."""
    for callback in trainer_callbacks:
        message = refusal(callback)
        if message is not None:
            raise ValueError(message)


def check_optimizers(optimizers: Iterable[Optimizer], pipeline_parallel_size: int) -> None:
    """Raises ``ValueError`` for an optimizer whose step evaluates the closure a number of times that depends on the
    values it sees (``LBFGS`` and its subclasses) when ``pipeline_parallel_size > 1``: each pipeline rank holds
    different parameters, so the ranks would run different numbers of pipelined steps and wait for each other until
    the timeout."""
    if pipeline_parallel_size <= 1:
        return
    for optimizer in optimizers:
        if isinstance(optimizer, LBFGS):
            name = type(optimizer).__name__
            label = name if name == "LBFGS" else f"{name} (an LBFGS)"
            raise ValueError(
                f"The optimizer {label} cannot be used with pipeline_parallel_size={pipeline_parallel_size}: its step "
                "evaluates the closure (a whole pipelined step) a number of times that depends on the gradients of "
                "the parameters a rank holds, which differ between pipeline ranks, so the ranks would wait for each "
                "other until the timeout. Use a first-order optimizer (e.g. torch.optim.AdamW or SGD), or "
                "pipeline_parallel_size=1."
            )
