"""Checks that a schedule cannot hang on NCCL, by a model of how NCCL runs point-to-point transfers.

NCCL does not match messages by tag. It runs the transfers of a rank in the order they are issued, on a stream: one
per pair of ranks for single ``isend``/``irecv`` calls, and, for ``batch_isend_irecv``, the communicator of the whole
group. The model follows the executor and these rules:

- A rank issues its actions in order without waiting, except for the shapes (header) of a stage boundary, which it
  reads on the host at the boundary's first receive.
- Each communication group (:func:`lightning_bfpp.plan.schedule.communication_groups`) is one unit on the stream: its
  transfers are posted at once and the unit ends when all of them are done. Issued as single operations, each
  transfer is a unit of its own. The sender adds the header of a boundary right before its first activation; the
  receiver issues the part of the group before the boundary's first receive, then receives the header on its own
  and waits for it, then issues the rest of the group.
- A unit starts when it is first on its stream and the rank's computes issued before it are done (the stream waits
  for the compute stream). A receive and a send are done together, when both are started and each is the next
  transfer of its unit for that peer (rendezvous); if the two name different messages, NCCL would pair them anyway.
- A compute waits for the previous compute and for the unit that holds its input.

Pure Python, no torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from lightning_bfpp.plan.schedule import COMMUNICATION_KINDS, Action, ActionKind, Schedule, communication_groups
from lightning_bfpp.plan.schedule_validation import _fail

Streams = Literal["pair", "rank"]
"""``"pair"``: one stream per pair of ranks (single operations); ``"rank"``: one stream per rank for all its peers
(``batch_isend_irecv``)."""

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

    def pending_with(self, peer: int) -> bool:
        return bool(self.sends.get(peer)) or bool(self.recvs.get(peer))

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


def _rank_items(schedule: Schedule, rank: int, batched: bool) -> list[tuple[str, object]]:
    """What ``rank`` issues, in order: computes, units of transfers, and host waits for a boundary's shapes."""
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
            if a.kind is ActionKind.RECV_ACT and a.stage not in header_received:
                # the executor issues what it has of the group, then reads the shapes on the host
                header_received.add(a.stage)
                if unit.left:
                    items.append(("unit", unit))
                    unit = _Unit(rank, [], computes)
                header = _Unit(rank, [], computes)
                header.add(False, peer, ("header", a.stage, 0))
                items += [("unit", header), ("wait", header)]
            if a.kind is ActionKind.SEND_ACT and a.stage + 1 not in header_sent:
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


def check_stream_order(
    schedule: Schedule,
    *,
    streams: Streams = "rank",
    batched: bool = True,
    _items: list[list[tuple[str, object]]] | None = None,
) -> None:
    """Runs the model (see the module docstring); raises :class:`~lightning_bfpp.plan.schedule.ScheduleError` naming the
    blocked ranks and transfers if NCCL could hang or pair the wrong messages.

    Arguments:
        schedule: the schedule to check.
        streams: ``"pair"``, one stream per pair of ranks; ``"rank"``, one stream per rank for all its peers.
        batched: each communication group is issued as one ``batch_isend_irecv`` (what the executor does); False:
            every send and receive is issued on its own.
    """
    size = schedule.pipeline_size
    if _items is None:
        _items = [_rank_items(schedule, r, batched) for r in range(size)]
    ranks = [_Rank(_fresh(items)) for items in _items]
    per_pair = streams == "pair"
    queues: dict[tuple[int, int], deque[_Unit]] = {}  # (rank, peer), or (rank, -1) for one stream per rank
    neighbours = [sorted({(r - 1) % size, (r + 1) % size} - {r}) for r in range(size)]

    def head(rank: int, peer: int) -> _Unit | None:
        """The unit first on ``rank``'s stream to ``peer``, if it has started."""
        queue = queues.get((rank, peer if per_pair else -1))
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
                    for peer in sorted({*item.sends, *item.recvs}) if per_pair else [-1]:
                        queues.setdefault((rank, peer), deque()).append(item)
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
                for r, q in ((rank, peer), (peer, rank)):  # retire finished units
                    queue = queues.get((r, q if per_pair else -1))
                    while queue and not (queue[0].pending_with(q) if per_pair else queue[0].left):
                        queue.popleft()
    if mismatches or any(s.issued < len(s.items) or s.computes for s in ranks) or any(queues.values()):
        raise _fail(schedule, _hang_report(ranks, queues, mismatches, per_pair, batched))


def _hang_report(
    ranks: list[_Rank],
    queues: dict[tuple[int, int], deque[_Unit]],
    mismatches: list[str],
    per_pair: bool,
    batched: bool,
) -> list[str]:
    how = "groups issued as batch_isend_irecv" if batched else "every transfer issued on its own"
    where = "one stream per pair of ranks" if per_pair else "one stream per rank"
    problems = [f"NCCL could hang ({how}, {where}); the first blocked transfers:", *mismatches]
    for rank, state in enumerate(ranks):
        if state.issued < len(state.items) and state.items[state.issued][0] == "wait":
            problems.append(f"rank {rank} waits on the host for the shapes of its next input")
        if state.computes:
            action, needs = state.computes[0]
            label = needs.label if needs is not None else "?"
            problems.append(f"rank {rank} cannot run {action}: it waits for the transfers of group {label}")
    for (rank, peer), queue in sorted(queues.items()):
        if not queue:
            continue
        unit = queue[0]
        peers = [peer] if per_pair else sorted({*unit.sends, *unit.recvs})
        todo = [f"send {_describe(unit.sends[p][0])} to rank {p}" for p in peers if unit.sends.get(p)]
        todo += [f"receive {_describe(unit.recvs[p][0])} from rank {p}" for p in peers if unit.recvs.get(p)]
        stream_name = f"rank {rank}'s stream" + (f" to rank {peer}" if per_pair else "")
        problems.append(f"{stream_name} is stuck in group {unit.label}: it has yet to {' and '.join(todo)}")
    return problems


def validate_stream_order(schedule: Schedule) -> None:
    """Checks that the executor's transfers (groups issued as ``batch_isend_irecv``) cannot hang on NCCL, with one
    stream per pair of ranks and with one stream per rank; raises :class:`~lightning_bfpp.plan.schedule.ScheduleError`
    naming the blocked ranks and transfers."""
    items = [_rank_items(schedule, r, batched=True) for r in range(schedule.pipeline_size)]
    for streams in ("rank", "pair"):
        check_stream_order(schedule, streams=streams, batched=True, _items=items)  # type: ignore[arg-type]
