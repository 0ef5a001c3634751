"""The non-finite policy of :class:`~lightning_bfpp.BFPPStrategy`: raise, or skip the optimizer step, when a
loss or gradient is not finite; with a gradient scaler (``16-mixed``), an overflow skips the step and backs off."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_bfpp.run.nonfinite import NonFiniteCheck, NonFiniteError, back_off


class NonFinitePolicy:
    """Strategy methods that check each step for non-finite values; mixed into ``BFPPStrategy`` (it uses the
    strategy's ``lightning_module``, ``precision_plugin``, ``root_device``, ``global_rank`` and ``nonfinite_loss``)."""

    skipped_steps: int = 0  # optimizer steps skipped for non-finite values (nonfinite_loss="skip")
    _skip_optimizer_step: bool = False
    _nonfinite: NonFiniteCheck | None = None

    def _add_losses(self, batch_idx: int, losses: list[torch.Tensor]) -> None:
        if self._nonfinite is None:
            self._nonfinite = NonFiniteCheck(self.global_rank, self.root_device)  # type: ignore[attr-defined]
        self._nonfinite.add_losses(batch_idx, losses)

    def _start_nonfinite_check(self, extra: list[int], checks: bool = True) -> Tensor:
        """Starts agreeing on every rank whether a loss of this accumulation window or a gradient is non-finite (only
        if ``checks``: zeros otherwise), and on ``extra`` (reduced with MAX in the same all-reduce): the flags, on the
        device, to read on the host with the step's other values; hand the first two to
        :meth:`_finish_nonfinite_check`."""
        assert self._nonfinite is not None
        if not checks:
            return self._nonfinite.start_extra(extra)
        module = self.lightning_module  # type: ignore[attr-defined]
        named_grads = [(n, p.grad) for n, p in module.named_parameters() if p.grad is not None]
        return self._nonfinite.start(named_grads, extra)

    def _finish_nonfinite_check(self, batch_idx: int, flags: list[float]) -> None:
        """From the flags' values: raises, or zeroes the gradients and marks the optimizer step to be skipped (see
        :meth:`optimizer_step`).

        With a gradient scaler (``16-mixed``), non-finite gradients alone are an overflow of the scaled gradients:
        every rank skips the step and backs off the scale, whatever ``nonfinite_loss`` says."""
        assert self._nonfinite is not None
        trainer = self.lightning_module.trainer  # type: ignore[attr-defined]
        found = self._nonfinite.finish(flags)
        if not found:
            return
        scaler = self._scaler
        overflow = scaler is not None and self._nonfinite.gradients_only
        where = f"global step {trainer.global_step} (batch {batch_idx} of epoch {trainer.current_epoch})"
        if self.nonfinite_loss == "raise" and not overflow:  # type: ignore[attr-defined]
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
        scaler = getattr(self.precision_plugin, "scaler", None)  # type: ignore[attr-defined]
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _loss_scale(self) -> float | Tensor:
        """The scaler's current scale (1 without one; a device tensor, not read on the host), on every rank: scaling
        creates the scale on this rank's device, which unscaling the gradients needs on ranks without the loss too."""
        scaler = self._scaler
        device = self.root_device  # type: ignore[attr-defined]
        return 1.0 if scaler is None else scaler.scale(torch.ones((), device=device))

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        """With ``nonfinite_loss="skip"`` or a gradient scaler, runs the training step (the closure) first and steps
        the optimizer only if no rank found a non-finite loss or gradient. The scaler then unscales (before clipping),
        steps and grows its scale as on one process: every rank's gradients are finite, so every rank agrees."""
        step = super().optimizer_step  # type: ignore[misc]
        if self.nonfinite_loss != "skip" and self._scaler is None:  # type: ignore[attr-defined]
            return step(optimizer, closure, model, **kwargs)
        result = closure()
        if self._skip_optimizer_step:
            self._skip_optimizer_step = False
            return result
        return step(optimizer, lambda: result, model, **kwargs)
