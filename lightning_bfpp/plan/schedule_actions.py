"""The vocabulary of pipeline schedules: actions, their kinds, the :class:`Schedule` that holds them per rank, and
the point-to-point messages each compute implies.

Pure Python, so schedules can be built, printed and checked without torch.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class ActionKind(str, enum.Enum):
    """What an action does; the value is the short tag used when printing actions."""

    FORWARD = "F"  # forward of stage s on micro-batch m (the last stage also computes the loss)
    BACKWARD = "B"  # backward of stage s on micro-batch m
    RECV_ACT = "RA"  # post the receive of stage s's input for micro-batch m, from the rank of s-1
    SEND_ACT = "SA"  # send the output of stage s, micro-batch m, to the rank of s+1
    RECV_GRAD = "RG"  # post the receive of the gradient of stage s's output, micro-batch m, from the rank of s+1
    SEND_GRAD = "SG"  # send the gradient of stage s's input, micro-batch m, to the rank of s-1
    REDUCE_GRAD = "RD"  # start the data-parallel gradient reduction of stage s (micro_batch is -1)
    GATHER = "AG"  # start all-gathering the sharded parameters of stage s (micro_batch is -1; see gathering.py)
    RESHARD = "FR"  # free the gathered parameters of stage s (micro_batch is -1; see gathering.py)
    BACKWARD_WEIGHT = "W"  # weight gradients of stage s's finished run of backwards (micro_batch -1; weight_flush.py)
    GROUP_END = "|"  # ends a communication group: the transfers around it are issued as two groups (stage is -1)


_F, _B, _RA, _SA, _RG, _SG, _RD, _W = (
    ActionKind.FORWARD,
    ActionKind.BACKWARD,
    ActionKind.RECV_ACT,
    ActionKind.SEND_ACT,
    ActionKind.RECV_GRAD,
    ActionKind.SEND_GRAD,
    ActionKind.REDUCE_GRAD,
    ActionKind.BACKWARD_WEIGHT,
)


@dataclass(frozen=True, slots=True)
class Action:
    """One step of a rank's schedule: ``kind`` applied to ``stage`` and ``micro_batch`` (-1 for REDUCE_GRAD)."""

    kind: ActionKind
    stage: int
    micro_batch: int = -1

    def __str__(self) -> str:
        if self.kind is ActionKind.GROUP_END:
            return self.kind.value
        suffix = "" if self.micro_batch < 0 else f".{self.micro_batch}"
        return f"{self.kind.value}{self.stage}{suffix}"


PARAMETER_KINDS = frozenset({ActionKind.GATHER, ActionKind.RESHARD})
"""Actions that move parameters, not activations: present only with sharded parameters."""

PASS_KINDS = PARAMETER_KINDS | {ActionKind.BACKWARD_WEIGHT}
"""Actions that a pass adds to a built schedule when an option needs them, each pass with its own validator."""

COMMUNICATION_KINDS = frozenset({ActionKind.RECV_ACT, ActionKind.SEND_ACT, ActionKind.RECV_GRAD, ActionKind.SEND_GRAD})
"""Point-to-point actions between pipeline ranks."""


GROUP_END = Action(ActionKind.GROUP_END, -1)
"""Separates two communication groups that would otherwise be one (see :func:`communication_groups`)."""


def communication_groups(actions: Sequence[Action]) -> list[tuple[int, ...]]:
    """The positions of each communication group in a rank's ``actions``: a maximal run of consecutive
    point-to-point actions (a GROUP_END marker splits it), which the executor issues together as one
    ``batch_isend_irecv``."""
    groups: list[tuple[int, ...]] = []
    for i, action in enumerate(actions):
        if action.kind not in COMMUNICATION_KINDS:
            continue
        if groups and groups[-1][-1] == i - 1:
            groups[-1] = (*groups[-1], i)
        else:
            groups.append((i,))
    return groups


class ScheduleError(ValueError):
    """A schedule cannot be built with the given settings, or a schedule is invalid."""


def stage_rank(stage: int, pipeline_size: int) -> int:
    """The pipeline rank that holds ``stage`` under looped placement."""
    return stage % pipeline_size


@dataclass(frozen=True)
class Schedule:
    """The global schedule of one step: ``actions[rank]`` is what that pipeline rank executes, in order."""

    name: str
    pipeline_size: int
    stages_per_rank: int
    num_micro_batches: int
    forward_only: bool
    actions: tuple[tuple[Action, ...], ...]

    @property
    def num_stages(self) -> int:
        return self.pipeline_size * self.stages_per_rank

    def rank_of(self, stage: int) -> int:
        """The pipeline rank that holds ``stage``."""
        return stage_rank(stage, self.pipeline_size)

    def stages_of(self, rank: int) -> list[int]:
        """The stages held by ``rank``, in local order."""
        return list(range(rank, self.num_stages, self.pipeline_size))

    def format(self) -> str:
        """One line per rank, e.g. ``rank 0: F0.0 SA0.0 F0.1 ...``."""
        return "\n".join(f"rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(self.actions))


# ---------------------------------------------------------------------------------------------------------------
# the point-to-point messages implied by the computes, shared by the generators and the validation


def _recvs_for(action: Action, num_stages: int, pipeline_size: int) -> list[Action]:
    """The receive a compute action needs (none for P == 1, where tensors are handed over locally)."""
    if pipeline_size > 1 and action.kind is _F and action.stage > 0:
        return [Action(_RA, action.stage, action.micro_batch)]
    if pipeline_size > 1 and action.kind is _B and action.stage < num_stages - 1:
        return [Action(_RG, action.stage, action.micro_batch)]
    return []


def _sends_for(action: Action, num_stages: int, pipeline_size: int) -> list[Action]:
    """The send that follows a compute action."""
    if pipeline_size > 1 and action.kind is _F and action.stage < num_stages - 1:
        return [Action(_SA, action.stage, action.micro_batch)]
    if pipeline_size > 1 and action.kind is _B and action.stage > 0:
        return [Action(_SG, action.stage, action.micro_batch)]
    return []


def _matching_recv(send: Action) -> Action:
    """The receive of the message ``send`` sends."""
    if send.kind is _SA:
        return Action(_RA, send.stage + 1, send.micro_batch)
    return Action(_RG, send.stage - 1, send.micro_batch)


def _first_of(actions: Iterable[Action], kind: ActionKind) -> dict[int, Action]:
    first: dict[int, Action] = {}
    for action in actions:
        if action.kind is kind:
            first.setdefault(action.stage, action)
    return first
