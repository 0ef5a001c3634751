"""A lost rank: turns the communication error a rank sees when another process died, or did not answer within the
timeout, into one that names the lost rank (when a transfer tells which), the timeout and how to resume."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist

from lightning_bfpp.run.nonfinite import NonFiniteError
from lightning_bfpp.run.p2p import TransferError

# what gloo, NCCL and the c10d store say when a peer is gone or a wait ran out of time
_SIGNS = ("gloo", "NCCL", "Connection closed", "Connection reset", "Broken pipe", "Timed out", "timed out", "Timeout")


class RankLostError(RuntimeError):
    """A transfer or collective failed: another process died, or did not answer within the timeout."""


def is_communication_failure(error: BaseException) -> bool:
    """Whether ``error`` comes from a transfer or a collective that could not complete."""
    if isinstance(error, (TransferError, RankLostError)):
        return True
    if isinstance(error, NonFiniteError):  # agreed on by every rank: not a lost one
        return False
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    return isinstance(error, RuntimeError) and any(sign in str(error) for sign in _SIGNS)


_entered: list[str] = []  # the ``where`` of each enclosing explain_lost_rank, outermost first


@contextmanager
def explain_lost_rank(where: str, rank: int, timeout: timedelta, world_size: int = 0) -> Iterator[None]:
    """Re-raises a communication failure inside the block as :class:`RankLostError`; other errors pass unchanged.
    The lost rank is named when a transfer tells which, or when ``world_size`` is 2 (the other one).

    Nested blocks name the outermost one, the innermost in brackets: "during the save of the checkpoint ... (a
    barrier)"."""
    _entered.append(where)
    try:
        yield
    except RankLostError:
        raise
    except RuntimeError as error:
        if not is_communication_failure(error):
            raise
        peer = getattr(error, "peer", None)
        if peer is None and world_size == 2:  # a collective: with two ranks, the other one
            peer = 1 - rank
        lost = f"global rank {peer}" if peer is not None else "another rank"
        during = _entered[0] if len(_entered) == 1 else f"{_entered[0]} ({where})"
        raise RankLostError(
            f"Global rank {rank} lost {lost} during {during}: {error}\n"
            f"{lost[0].upper()}{lost[1:]} has died (look for an error, an out-of-memory kill or a node failure in its "
            f"log) or did not answer within the timeout of {timeout.total_seconds():g} s (set by "
            "BFPPStrategy(timeout=...); Hydra: strategy.timeout). Restart the job from its last checkpoint: "
            "trainer.fit(..., ckpt_path='last') (Hydra: ckpt_path=last)."
        ) from error
    finally:
        _entered.pop()
