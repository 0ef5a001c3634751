"""How a run of :class:`~lightning_bfpp.BFPPStrategy` ends when a process is signalled, fails alone, or hangs.

The strategy owns SIGTERM and SIGINT (and the SLURM requeue signal, where Lightning set one) during a run: a signal
to any one rank, or to all, is recorded and agreed on by every rank at the end of the next training step; then every
rank stops as Lightning stops on SIGTERM (``SIGTERMException`` at the end of that batch; checkpoint callbacks with
``save_on_exception=True`` save) and exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), not 0. An agreed
requeue signal runs Lightning's SLURM requeue (a checkpoint, then ``scontrol requeue``) on every rank at the start of
the next batch. See :mod:`lightning_bfpp.run.job_watch` for a rank that cannot get there in time, and for a rank
that hangs while the others give up on it.
"""

from __future__ import annotations

import signal
import sys
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_bfpp.lightning.internals import on_signal_handlers, stop_after_this_batch
from lightning_bfpp.run.faults import is_communication_failure
from lightning_bfpp.run.job_watch import AGREED_SIGNALS, STOP_SIGNALS, AgreedSignal, job_watch

STORE_TIMEOUT = timedelta(seconds=10)


class JobEnd:
    """Strategy methods that end every rank of a run together; mixed into ``BFPPStrategy`` (it uses the strategy's
    ``lightning_module``, ``cluster_environment``, ``global_rank``, ``world_size`` and ``root_device``).

    ``signal_grace`` (seconds, default 30): how long a signalled rank waits to stop together with the others at the
    end of a training step before it ends alone. ``end_grace`` (default 10): how long a rank may stay in a run after
    another rank lost a peer (a transfer or collective failed: a process died or did not answer within the timeout),
    or after the job's store went away, before it is ended; a rank that hangs ends then. Set both on the strategy
    (``strategy.signal_grace = 60``) before the run."""

    signal_grace: float = 30.0
    end_grace: float = 10.0
    _stop: AgreedSignal | None = None
    _requeue: tuple[int, Any] | None = None
    _requeue_handlers: dict[int, Any] = {}

    def _watch_job(self) -> None:
        """At set-up, once the default process group exists, on every rank."""
        watch = job_watch()
        watch.rank, watch.signal_grace, watch.end_grace = self.global_rank, self.signal_grace, self.end_grace  # type: ignore[attr-defined]
        if self.world_size > 1:  # type: ignore[attr-defined]
            environment = self.cluster_environment  # type: ignore[attr-defined]
            host, port = environment.main_address, environment.main_port
            watch.watch_job(self.global_rank, lambda: dist.TCPStore(host, port, timeout=STORE_TIMEOUT))  # type: ignore[attr-defined]
        on_signal_handlers(self.lightning_module.trainer, self._own_signals, watch.release_signals)  # type: ignore[attr-defined]

    def _own_signals(self, replaced: dict[int, Any]) -> None:
        """Takes over the handlers Lightning just installed (see :func:`internals.on_signal_handlers`)."""
        owned: dict[int, Any] = {}
        if signal.SIGTERM in replaced:
            before = replaced[signal.SIGTERM]
            owned[signal.SIGTERM] = before if callable(before) else None  # a user's handler, chained as Lightning does
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when ignored or a user's own
            owned[signal.SIGINT] = None
        requeue = (s for s in replaced if s in AGREED_SIGNALS and s not in STOP_SIGNALS)  # SLURM's USR1 or USR2
        self._requeue_handlers = {s: signal.getsignal(s) for s in requeue}
        owned.update(dict.fromkeys(self._requeue_handlers))
        self._stop, self._requeue = None, None
        job_watch().own_signals(owned)

    def _signal_flags(self) -> list[int]:
        """This rank's share of the agreement on signals, carried by the training step's one all-reduce over every
        rank (see ``BFPPStrategy._training_step``)."""
        return job_watch().signal_flags(self.world_size)  # type: ignore[attr-defined]

    def _act_on_signals(self, flags: list[float]) -> None:
        """At the end of every training step, on every rank, from the reduced :meth:`_signal_flags`: acts on the
        signals any rank received."""
        for agreed in job_watch().agreed(flags, self.world_size):  # type: ignore[attr-defined]
            if agreed.signum in STOP_SIGNALS:
                if self._stop is None:
                    self._stop = agreed
                    stop_after_this_batch(self.lightning_module.trainer)  # type: ignore[attr-defined]
                    step = self.lightning_module.trainer.global_step  # type: ignore[attr-defined]
                    self._tell(
                        f"{agreed.received_by} received {agreed.name}: every rank stops after this training step "
                        f"(global step {step}) as Lightning stops on SIGTERM, then exits with code "
                        f"{128 + agreed.signum}."
                    )
            else:
                self._requeue = (agreed.signum, self._requeue_handlers.get(agreed.signum))

    def _requeue_now(self) -> None:
        """At the start of a training batch, on every rank: runs Lightning's SLURM requeue handler once agreed."""
        if self._requeue is None:
            return
        (signum, handler), self._requeue = self._requeue, None
        if callable(handler):
            handler(signum, None)

    def _on_failure(self, exception: BaseException) -> None:
        """As soon as this rank sees ``exception`` (a training step's, then the run's): a lost or hung rank is told
        to the others (see :mod:`lightning_bfpp.run.job_watch`), so that any rank still in the run, a hung one, ends.
        Errors that every rank raises together (a non-finite value, a refused option) are not: their ranks may take
        their time in the callbacks' ``on_exception`` (a checkpoint save)."""
        if is_communication_failure(exception):
            first = str(exception).strip().splitlines()[:1]
            job_watch().announce_failure(f"{type(exception).__name__}{': ' + first[0] if first else ''}")

    def _on_run_exception(self, exception: BaseException) -> bool:
        """Called as a run ends with ``exception``; returns whether it is a stop by an agreed signal, which every
        rank ends together and cleanly (exit code ``128 + signal``)."""
        self._on_failure(exception)
        if not isinstance(exception, SIGTERMException) or self._stop is None:
            return False
        exception.code = 128 + self._stop.signum  # Lightning's has no code: exit status 0
        self._tell(f"stopped by {self._stop.name} ({self._stop.received_by}); exit code {exception.code}.")
        return True

    def _end_job_watch(self) -> None:
        """At the run's teardown, whatever its outcome: this rank is no longer in the run (not hung)."""
        job_watch().finish()

    def _tell(self, message: str) -> None:
        print(f"[rank {self.global_rank}] lightning_bfpp: {message}", file=sys.stderr, flush=True)  # type: ignore[attr-defined]
