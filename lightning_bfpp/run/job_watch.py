"""Ending a job together: a signal to one rank or to all, a rank that failed alone, a rank that hangs.

One :class:`JobWatch` per process, with a daemon thread:

- **Signals.** The watch owns SIGTERM and SIGINT (and, under SLURM auto-requeue, the requeue signal) while a run is
  on: a handler only records the signal, and the ranks act on it together at a step boundary (:meth:`JobWatch.agree`,
  one all-reduce), so that no rank runs a collective alone inside a signal handler while the others wait on pipeline
  transfers. The thread learns of each signal at once through ``signal.set_wakeup_fd`` (the main thread may be blocked
  in a transfer, where Python runs no handler); a rank that cannot reach a step boundary within ``signal_grace``
  seconds of its signal, or that gets the same signal twice, ends alone (exit ``128 + signal``), and the others see
  it lost.
- **No orphans.** A rank that loses a peer (a transfer or collective failed) writes a key into the job's store (the
  c10d ``TCPStore`` of the default process group, hosted by global rank 0): every other rank still in the run
  ``end_grace`` seconds after seeing it, or after the store itself went away, ends (exit 1) with a message; a hung
  rank thus ends shortly after the others gave up on it at the process-group timeout. A rank that reached the end of
  its run (its teardown), or is on its way out of a failed one, is left alone.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
AGREED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)  # stops, and requeue signals
ENDED_KEY = "lightning_bfpp/job_ended"
POLL_S = 1.0


@dataclass(frozen=True)
class AgreedSignal:
    """A signal that ``ranks`` (lowest and highest global rank that received it) got before a step boundary."""

    signum: int
    lowest: int
    highest: int

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def received_by(self) -> str:
        if self.lowest == self.highest:
            return f"global rank {self.lowest}"
        return f"global ranks {self.lowest} to {self.highest} (some or all of them)"


@dataclass(frozen=True)
class _Deadline:
    """When the watch ends this process unless disarmed: ``kind`` "signal" (a signal not agreed on in time) or
    "ended" (the job ended, this rank did not)."""

    at: float  # time.monotonic()
    message: str
    code: int
    kind: str


def _write(message: str) -> None:
    """Writes a line to stderr without Python's buffered streams (safe from a signal handler or any thread)."""
    os.write(2, (message.rstrip("\n") + "\n").encode(errors="replace"))


class JobWatch:
    """The watch of one process (see the module's docstring); get it with :func:`job_watch`."""

    def __init__(self) -> None:
        self.rank = 0
        self.signal_grace = 30.0
        self.end_grace = 10.0
        self._owned: dict[int, Callable[..., Any] | None] = {}  # owned signal -> handler to chain (or None)
        self._received: dict[int, float] = {}  # stop/deferred signal -> when this rank got it, not yet agreed
        self._counts: dict[int, int] = {}
        self._stopping = False  # a stop was agreed: later stop signals need no grace
        self._deadline: _Deadline | None = None
        self._wakeup: tuple[int, int] | None = None  # (read end, write end)
        self._previous_wakeup = -1
        self._client: dist.Store | None = None
        self._store_factory: Callable[[], dist.Store] | None = None
        self._ended_key = ENDED_KEY
        self._runs = 0
        self._watching = False
        self._failing = False  # this rank is on its way out of a failed run: not a hung one
        self._store_lock = threading.RLock()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------ signals
    def own_signals(self, signals: dict[int, Callable[..., Any] | None]) -> None:
        """Installs the recording handler for each of ``signals`` (main thread only), chaining the given handler
        (a user's, called from the main thread as it would have been), until :meth:`release_signals`."""
        if threading.current_thread() is not threading.main_thread() or not signals:
            return
        self._start_thread()
        assert self._wakeup is not None
        self._previous_wakeup = signal.set_wakeup_fd(self._wakeup[1], warn_on_full_buffer=False)
        self._owned = dict(signals)
        self._received, self._counts, self._stopping = {}, {}, False
        for signum in signals:
            signal.signal(signum, self._handle)

    def release_signals(self) -> None:
        """Stops acting on signals (the caller restores the handlers of before)."""
        if self._owned and threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._previous_wakeup)
        self._owned = {}
        self._received.clear()
        self._disarm("signal")

    def _handle(self, signum: int, frame: Any) -> None:
        chained = self._owned.get(signum)
        if callable(chained):
            chained(signum, frame)

    def _on_signal(self, signum: int) -> None:
        """Runs on the watch thread for each signal this process got (from the wakeup fd)."""
        if signum not in self._owned:
            return
        if signum not in STOP_SIGNALS:
            self._received.setdefault(signum, time.monotonic())
            return
        self._counts[signum] = self._counts.get(signum, 0) + 1
        name = signal.Signals(signum).name
        if self._counts[signum] > 1:
            self._end(f"global rank {self.rank} got {name} a second time: ending it now, without saving.", 128 + signum)
        if self._stopping:
            return
        self._received.setdefault(signum, time.monotonic())
        message = (
            f"global rank {self.rank} received {name} and could not stop together with the other ranks at the end "
            f"of a training step within {self.signal_grace:g} s (outside training, in a long step, or blocked): "
            "ending this rank alone, without saving."
        )
        self._arm(_Deadline(time.monotonic() + self.signal_grace, message, 128 + signum, "signal"))

    def pending(self) -> set[int]:
        """The signals this rank received that are not agreed on yet."""
        return set(self._received)

    def signal_flags(self, world: int) -> list[int]:
        """This rank's contribution to the agreement on signals at a step boundary (two slots per watched signal),
        to be reduced with MAX over every rank of the ``world`` (e.g. in the step's one all-reduce) and handed to
        :meth:`agreed`."""
        received = dict(self._received)
        flags = [self.rank + 1 if s in received else 0 for s in AGREED_SIGNALS]  # the same slots on every rank
        return flags + [world - self.rank if s in received else 0 for s in AGREED_SIGNALS]

    def agreed(self, flags: Sequence[float], world: int) -> list[AgreedSignal]:
        """The signals any rank received since the last agreement, from the reduced :meth:`signal_flags`, each with
        the lowest and highest global rank that received it. A stop signal among them disarms the ranks' grace: the
        caller stops every rank together."""
        n, reduced = len(AGREED_SIGNALS), [int(f) for f in flags]
        agreed = [
            AgreedSignal(s, world - reduced[n + i], reduced[i] - 1) for i, s in enumerate(AGREED_SIGNALS) if reduced[i]
        ]
        for item in agreed:
            self._received.pop(item.signum, None)
        if any(item.signum in STOP_SIGNALS for item in agreed):
            self._stopping = True
            self._disarm("signal")
        return agreed

    # ----------------------------------------------------------------------------------------------- the job
    def watch_job(self, rank: int, store_factory: Callable[[], dist.Store]) -> None:
        """Starts watching the job's store for a rank that failed alone, for a run that every rank starts (their
        runs are counted alike, so each run has its own key)."""
        self.rank = rank
        self._runs += 1
        with self._store_lock:
            self._store_factory, self._client = store_factory, None
            self._ended_key = f"{ENDED_KEY}/{self._runs}"
            self._failing = False
            self._watching = True
        self._start_thread()

    def finish(self) -> None:
        """This rank's run ended (it reached its teardown, whatever the outcome): stop watching the job; a process
        that goes on (another run, or a script that caught the error) is left alone."""
        with self._store_lock:
            self._watching = False
            self._disarm("ended")

    def announce_failure(self, reason: str) -> None:
        """This rank's run failed (``reason``): tells the other ranks (best effort), so that any of them still in
        the run ``end_grace`` seconds later, a hung one, is ended. This rank is then on its way out, each of its
        remaining collectives bounded by the process-group timeout: the watch no longer ends it."""
        with self._store_lock:
            self._failing = True
            self._disarm("ended")  # armed when the store went away before this rank saw its error
        self._tell(reason)

    def _tell(self, reason: str) -> None:
        """Sets the run's key in the job's store, if watching: every other rank ends within ``end_grace``."""
        with self._store_lock, contextlib.suppress(Exception):  # the store's host is gone: the others see it too
            if self._watching:
                self._connected().set(self._ended_key, f"global rank {self.rank}: {reason}"[:2000])

    def _connected(self) -> dist.Store:
        if self._client is None:
            assert self._store_factory is not None
            self._client = self._store_factory()
        return self._client

    def _poll_store(self) -> None:
        with self._store_lock:  # finish() takes it too: no deadline is armed once the run ended here
            if not self._watching or self._failing or (self._deadline is not None and self._deadline.kind == "ended"):
                return
            try:
                store = self._connected()
                reason = store.get(self._ended_key).decode() if store.check([self._ended_key]) else None
            except Exception as error:
                reason = f"the job's store (hosted by global rank 0) is unreachable: {str(error).splitlines()[0]}"
            if reason is not None:
                message = f"the job is ending ({reason[:500]}); global rank {self.rank} is still in its run after"
                at = time.monotonic() + self.end_grace
                self._arm(_Deadline(at, f"{message} {self.end_grace:g} s: ending it.", 1, "ended"))

    # --------------------------------------------------------------------------------------------- the thread
    def _arm(self, deadline: _Deadline) -> None:
        if self._deadline is None or deadline.at < self._deadline.at:
            self._deadline = deadline

    def _disarm(self, kind: str) -> None:
        if self._deadline is not None and self._deadline.kind == kind:
            self._deadline = None

    def _end(self, message: str, code: int, tell: bool = True) -> None:
        _write(f"[lightning_bfpp] {message}")
        if tell:  # the other ranks end too (a failure or the job's end was told already)
            self._tell(message)
        os._exit(code)

    def _start_thread(self) -> None:
        if self._thread is not None:
            return
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._wakeup = (read, write)
        self._thread = threading.Thread(target=self._watch_loop, name="lightning_bfpp-job-watch", daemon=True)
        self._thread.start()

    def _watch_loop(self) -> None:
        assert self._wakeup is not None
        read = self._wakeup[0]
        last_poll = 0.0
        while True:
            ready, _, _ = select.select([read], [], [], POLL_S / 4)
            if ready:
                for byte in os.read(read, 256):
                    self._on_signal(byte)
            now = time.monotonic()
            if now - last_poll >= POLL_S:
                last_poll = now
                self._poll_store()
            deadline = self._deadline
            if deadline is not None and time.monotonic() >= deadline.at:
                self._end(deadline.message, deadline.code, tell=deadline.kind == "signal")


_watch = JobWatch()


def job_watch() -> JobWatch:
    """This process's watch."""
    return _watch
