"""A point-to-point link over gloo that runs transfers in NCCL's order, so CPU runs catch orders that hang on GPUs.

NCCL runs the transfers of a rank in issue order on one stream, one ``batch_isend_irecv`` group at a time: a group
holds the stream until every transfer in it is done, a receive is done when its data has arrived and a send when the
peer's matching receive has run (rendezvous). Inside a group the transfers to different peers progress independently.
Gloo matches messages by tag and buffers sends, which hides orders that hang on NCCL. :class:`NcclOrderLink` gives
each rank one worker thread, its stream for all peers, that runs the groups in issue order; a group's transfers are
posted together, each receive is acknowledged as soon as its own data is here, a send ends only with that
acknowledgement, and the group ends when all of them have.

Pass it as ``BFPPStrategy(link_class=NcclOrderLink)`` (or ``StagePipeline.build(link_class=...)``) on gloo to check
that a schedule or a custom link runs under NCCL's ordering: a hang there is a hang on GPUs. A subclass may give
each transfer a duration (:meth:`NcclOrderLink.transfer_seconds`) to emulate a network.
"""

from __future__ import annotations

import queue
import threading
import weakref

import torch
import torch.distributed as dist

from lightning_bfpp.run.p2p import PeerLink, Transfer, as_p2p_op

ACK_TAG_OFFSET = 1 << 24
"""An acknowledgement uses the tag of its message plus this (above every message tag of :class:`PeerLink`)."""


class _Group:
    """The transfers of one ``batch_isend_irecv`` on the rank's stream; ``done`` is set when all of them have run."""

    def __init__(self, link: NcclOrderLink, ops: list[dist.P2POp]) -> None:
        self.link, self.ops = link, ops
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            works, acks = [], []
            for op in self.ops:
                works.append(op.op(op.tensor, op.peer, op.group, op.tag))
                if op.op is dist.isend:  # a send ends when the peer has received it
                    acks.append(
                        dist.irecv(torch.zeros(1, dtype=torch.uint8), op.peer, op.group, op.tag + ACK_TAG_OFFSET)
                    )
            # Each receive completes on its own (the last one on this thread, the others on threads of their own):
            # waiting for them in turn would make a send to this rank wait for this rank's earlier receives of the
            # group, an order NCCL does not impose (it can hang a schedule that NCCL runs).
            receives = [(op, work) for op, work in zip(self.ops, works, strict=True) if op.op is dist.irecv]
            others = [threading.Thread(target=self._receive, args=pair, daemon=True) for pair in receives[:-1]]
            for other in others:
                other.start()
            if receives:
                self._receive(*receives[-1])
            for other in others:
                other.join()
            if self.error is None:
                for op, work in zip(self.ops, works, strict=True):  # a gloo work is waited for once only
                    if op.op is dist.isend:
                        work.wait()
                for ack in acks:
                    ack.wait()
        except BaseException as error:  # handed to the thread that waits
            self.error = error
        finally:
            self.done.set()

    def _receive(self, op: dist.P2POp, work: dist.Work) -> None:
        """Waits for one message, lets its transfer take its time from there (both sides have posted it), then
        tells the sender that it has ended."""
        try:
            work.wait()
            seconds = self.link.transfer_seconds(op.tensor, op.peer)  # P2POp's peer is a global rank
            if seconds > 0:
                threading.Event().wait(seconds)
            dist.send(torch.ones(1, dtype=torch.uint8), op.peer, op.group, op.tag + ACK_TAG_OFFSET)
        except BaseException as error:
            self.error = error


class _GroupWork:
    """What the executor waits on: the whole group (it completes as a whole, as on NCCL)."""

    def __init__(self, group: _Group) -> None:
        self.group = group

    def wait(self) -> bool:
        self.group.done.wait()
        if self.group.error is not None:
            raise RuntimeError(f"NCCL-ordered transfer failed: {self.group.error}") from self.group.error
        return True


class NcclOrderLink(PeerLink):
    """:class:`~lightning_bfpp.run.p2p.PeerLink` over gloo with NCCL's ordering (see the module docstring)."""

    emulates_nccl = True

    def __init__(self, group: dist.ProcessGroup, num_micro_batches: int, device: torch.device) -> None:
        super().__init__(group, num_micro_batches, device)
        self._stream: queue.SimpleQueue[_Group | None] = queue.SimpleQueue()
        threading.Thread(target=_stream_worker, args=(self._stream,), daemon=True).start()
        weakref.finalize(self, self._stream.put, None)  # the worker ends with the link

    def transfer_seconds(self, tensor: torch.Tensor, src: int) -> float:
        """How long the transfer of ``tensor`` from global rank ``src`` to this rank lasts once both sides have
        posted it: 0 here (as fast as gloo); a network emulation overrides it."""
        return 0.0

    def _start(self, transfers: list[Transfer]) -> list[dist.Work]:
        group = _Group(self, [as_p2p_op(transfer, self.group) for transfer in transfers])
        self._stream.put(group)
        return [_GroupWork(group)]  # type: ignore[list-item]


def _stream_worker(groups: queue.SimpleQueue[_Group | None]) -> None:
    while (group := groups.get()) is not None:
        group.run()
        del group  # the worker holds nothing of the link between groups
