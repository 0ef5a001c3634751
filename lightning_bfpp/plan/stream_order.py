"""Checks that a schedule cannot hang on NCCL, by a model of how NCCL runs point-to-point transfers.

NCCL does not match messages by tag. The executor posts every transfer of a communication group as one
``batch_isend_irecv`` on the pipeline group's communicator, which runs a rank's transfers to all its peers in issue
order on one stream (a lone ``isend``/``irecv`` does too, on a group created eagerly, as the strategy creates them on
GPUs). The model follows the executor and these rules:

- A rank issues its actions in order without waiting, except in a step that learns the shapes (header) of a stage
  boundary: the first step of each batch shape, where the receiver reads them on the host at the boundary's first
  receive. Later steps with the same shapes send no header and never wait on the host; both kinds of step are
  checked.
- Each communication group (:func:`lightning_bfpp.plan.schedule.communication_groups`) is one unit on the stream: its
  transfers are posted at once and the unit ends when all of them are done. Issued as single operations, each
  transfer is a unit of its own. In a step with headers, the sender adds the header of a boundary right before its
  first activation; the receiver issues the part of the group before the boundary's first receive, then receives the
  header on its own and waits for it, then issues the rest of the group.
- A unit starts when it is first on its rank's stream and the rank's computes issued before it are done (the stream
  waits for the compute stream). A receive and a send are done together, when both are started and each is the next
  transfer of its unit for that peer (rendezvous); if the two name different messages, NCCL would pair them anyway.
- A compute waits for the previous compute and for the unit that holds its input.

Pure Python, no torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lightning_bfpp.plan.schedule import COMMUNICATION_KINDS, Action, ActionKind, Schedule, communication_groups
from lightning_bfpp.plan.schedule_validation import _fail

Message = tuple[str, int, int]  # ("act" | "grad" | "header", downstream stage of the boundary, micro-batch)


@dataclass(eq=False)
class _Unit:
    """Transfers posted together; ``sends[peer]`` and ``recvs[peer]`` in the order they run."""

    rank: int
    actions: list[Action]  # the group's actions (empty for a header)
    computes_before: int  # the rank's computes issued before it: the stream waits for them
    sends: dict[int, deque[Message]] = field(default_factory=dict)
    recvs: dict[int, deque[Message]] = field(default_factory=dict)
    left: int = 0  # transfers not done yet

    def add(self, send: bool, peer: int, message: Message) -> None:
        book = self.sends if send else self.recvs
        if peer in book:
            book[peer].append(message)
        else:
            book[peer] = deque((message,))
        self.left += 1

    def fresh(self) -> _Unit:
        """A copy with none of its transfers done."""
        sends = {peer: deque(messages) for peer, messages in self.sends.items()}
        recvs = {peer: deque(messages) for peer, messages in self.recvs.items()}
        return _Unit(self.rank, self.actions, self.computes_before, sends, recvs, self.left)

    @property
    def label(self) -> str:
        return " ".join(map(str, self.actions)) if self.actions else "(shapes)"


@dataclass
class _Rank:
    items: list[tuple[str, object]]  # ("compute", (action, unit or None)) | ("unit", _Unit) | ("wait", _Unit)
    issued: int = 0
    computes: deque[tuple[Action, _Unit | None]] = field(default_factory=deque)
    computes_done: int = 0


_SEND_ACT, _RECV_ACT, _SEND_GRAD = ActionKind.SEND_ACT, ActionKind.RECV_ACT, ActionKind.SEND_GRAD


def _transfer(size: int, action: Action) -> tuple[bool, int, Message]:
    """(is a send, peer rank, message) of a communication action, with ``size`` pipeline ranks."""
    k, s, m = action.kind, action.stage, action.micro_batch
    if k is _SEND_ACT:
        return True, (s + 1) % size, ("act", s + 1, m)
    if k is _RECV_ACT:
        return False, (s - 1) % size, ("act", s, m)
    if k is _SEND_GRAD:
        return True, (s - 1) % size, ("grad", s, m)
    return False, (s + 1) % size, ("grad", s + 1, m)


def _describe(message: Message) -> str:
    kind, stage, micro_batch = message
    if kind == "header":
        return f"the shapes of stage {stage}'s input"
    what = "the input of stage" if kind == "act" else "the gradient of the input of stage"
    return f"{what} {stage}, micro-batch {micro_batch}"


def _rank_items(schedule: Schedule, rank: int, batched: bool, headers: bool = True) -> list[tuple[str, object]]:
    """What ``rank`` issues, in order: computes, units of transfers, and (``headers``: a step that learns the shapes)
    host waits for a boundary's shapes."""
    actions = schedule.actions[rank]
    if batched:
        groups = communication_groups(actions)
    else:
        groups = [(i,) for i, a in enumerate(actions) if a.kind in COMMUNICATION_KINDS]
    group_at = {g[0]: g for g in groups}
    items: list[tuple[str, object]] = []
    recv_unit: dict[tuple[ActionKind, int, int], _Unit] = {}
    header_sent, header_received = set(), set()
    computes = 0
    for i, action in enumerate(actions):
        if action.kind is ActionKind.FORWARD or action.kind is ActionKind.BACKWARD:
            wanted = ActionKind.RECV_ACT if action.kind is ActionKind.FORWARD else ActionKind.RECV_GRAD
            items.append(("compute", (action, recv_unit.get((wanted, action.stage, action.micro_batch)))))
            computes += 1
        if i not in group_at:
            continue
        unit = _Unit(rank, [], computes)
        for a in (actions[j] for j in group_at[i]):
            send, peer, message = _transfer(schedule.pipeline_size, a)
            if headers and a.kind is ActionKind.RECV_ACT and a.stage not in header_received:
                # the executor issues what it has of the group, then reads the shapes on the host
                header_received.add(a.stage)
                if unit.left:
                    items.append(("unit", unit))
                    unit = _Unit(rank, [], computes)
                header = _Unit(rank, [], computes)
                header.add(False, peer, ("header", a.stage, 0))
                items += [("unit", header), ("wait", header)]
            if headers and a.kind is ActionKind.SEND_ACT and a.stage + 1 not in header_sent:
                header_sent.add(a.stage + 1)
                unit.add(True, peer, ("header", a.stage + 1, 0))
            unit.add(send, peer, message)
            unit.actions.append(a)
            if not send:
                recv_unit[(a.kind, a.stage, a.micro_batch)] = unit
        items.append(("unit", unit))
    return items


def _fresh(items: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """``items`` with fresh units (a header unit and the host wait for it share one)."""
    copies: dict[int, _Unit] = {}

    def fresh(unit: _Unit | None) -> _Unit | None:
        if unit is None:
            return None
        if id(unit) not in copies:
            copies[id(unit)] = unit.fresh()
        return copies[id(unit)]

    out: list[tuple[str, object]] = []
    for kind, item in items:
        if kind == "compute":
            action, unit = item  # type: ignore[misc]
            out.append((kind, (action, fresh(unit))))
        else:
            out.append((kind, fresh(item)))  # type: ignore[arg-type]
    return out


def check_stream_order(schedule: Schedule, *, batched: bool = True, headers: bool = True) -> None:
    """Runs the model (see the module docstring); raises :class:`~lightning_bfpp.plan.schedule.ScheduleError` naming the
    blocked ranks and transfers if NCCL could hang or pair the wrong messages.

    Arguments:
        schedule: the schedule to check.
        batched: each communication group is issued as one ``batch_isend_irecv`` (what the executor does); False:
            every send and receive is issued on its own.
        headers: a step that learns the boundaries' shapes (the first of each batch shape); False: a step with
            known shapes.
    """
    size = schedule.pipeline_size
    ranks = [_Rank(_fresh(_rank_items(schedule, r, batched, headers))) for r in range(size)]
    queues: dict[int, deque[_Unit]] = {}  # each rank's stream: the group communicator's, for all its peers
    neighbours = [sorted({(r - 1) % size, (r + 1) % size} - {r}) for r in range(size)]

    def head(rank: int, peer: int) -> _Unit | None:
        """The unit first on ``rank``'s stream to ``peer``, if it has started."""
        queue = queues.get(rank)
        if not queue or ranks[rank].computes_done < queue[0].computes_before:
            return None
        return queue[0]

    mismatches: list[str] = []
    progressed = True
    while progressed and not mismatches:
        progressed = False
        for rank, state in enumerate(ranks):
            while state.issued < len(state.items):  # issue until a host wait blocks
                kind, item = state.items[state.issued]
                if kind == "wait":
                    if item.left:  # type: ignore[union-attr]
                        break
                elif kind == "unit":
                    assert isinstance(item, _Unit)
                    queues.setdefault(rank, deque()).append(item)
                else:
                    state.computes.append(item)  # type: ignore[arg-type]
                state.issued += 1
                progressed = True
            while state.computes and (state.computes[0][1] is None or not state.computes[0][1].left):
                state.computes.popleft()
                state.computes_done += 1
                progressed = True
            for peer in neighbours[rank]:  # a send of this rank meets the peer's receive
                unit, other = head(rank, peer), head(peer, rank)
                while unit is not None and other is not None and unit.sends.get(peer) and other.recvs.get(rank):
                    sent, received = unit.sends[peer][0], other.recvs[rank][0]
                    if sent != received:
                        mismatches.append(
                            f"rank {rank} sends {_describe(sent)} (group {unit.label}) while rank {peer} receives "
                            f"{_describe(received)} (group {other.label}): NCCL pairs them in issue order"
                        )
                        break
                    unit.sends[peer].popleft()
                    other.recvs[rank].popleft()
                    unit.left -= 1
                    other.left -= 1
                    progressed = True
                for r in (rank, peer):  # retire finished units
                    queue = queues.get(r)
                    while queue and not queue[0].left:
                        queue.popleft()
    if mismatches or any(s.issued < len(s.items) or s.computes for s in ranks) or any(queues.values()):
        raise _fail(schedule, _hang_report(ranks, queues, mismatches, batched))


def _hang_report(
    ranks: list[_Rank],
    queues: dict[int, deque[_Unit]],
    mismatches: list[str],
    batched: bool,
) -> list[str]:
    how = "groups issued as batch_isend_irecv" if batched else "every transfer issued on its own"
    problems = [f"NCCL could hang ({how}, one stream per rank); the first blocked transfers:", *mismatches]
    for rank, state in enumerate(ranks):
        if state.issued < len(state.items) and state.items[state.issued][0] == "wait":
            problems.append(f"rank {rank} waits on the host for the shapes of its next input")
        if state.computes:
            action, needs = state.computes[0]
            label = needs.label if needs is not None else "?"
            problems.append(f"rank {rank} cannot run {action}: it waits for the transfers of group {label}")
    for rank, queue in sorted(queues.items()):
        if not queue:
            continue
        unit = queue[0]
        peers = sorted({*unit.sends, *unit.recvs})
        todo = [f"send {_describe(unit.sends[p][0])} to rank {p}" for p in peers if unit.sends.get(p)]
        todo += [f"receive {_describe(unit.recvs[p][0])} from rank {p}" for p in peers if unit.recvs.get(p)]
        problems.append(f"rank {rank}'s stream is stuck in group {unit.label}: it has yet to {' and '.join(todo)}")
    return problems


def validate_stream_order(schedule: Schedule) -> None:
    """Checks that the executor's transfers (groups issued as ``batch_isend_irecv`` on the group's communicator)
    cannot hang on NCCL, in a step that learns the boundaries' shapes and in a step that knows them; raises
    :class:`~lightning_bfpp.plan.schedule.ScheduleError` naming the blocked ranks and transfers."""
    for headers in (True, False):
        check_stream_order(schedule, batched=True, headers=headers)
