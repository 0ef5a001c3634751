"""A PeerLink that runs its transfers over gloo the way NCCL runs them, so CPU tests catch orders that hang on GPUs.

NCCL runs the transfers of a rank in issue order on a stream, one batch at a time: a receive holds the stream until
its data arrives, and a send until the peer's matching receive has run (rendezvous). Gloo matches messages by tag
and buffers sends, which hides orders that hang on NCCL. Here one worker thread, the rank's stream for all its peers,
runs the batches in issue order; a batch's transfers are posted together and the batch ends when all are done;
each received message is acknowledged and a send ends only with that acknowledgement, so sends are rendezvous too.
"""

from __future__ import annotations

import queue
import threading

import torch
import torch.distributed as dist

from lightning_bfpp.run.p2p import PeerLink, Transfer, as_p2p_op

ACK_TAG_OFFSET = 1 << 24  # acknowledgements use the tag of their message plus this


class _Batch:
    """The part of one ``batch_isend_irecv`` that runs on one stream; :meth:`wait` blocks until it has run."""

    def __init__(self, ops: list[dist.P2POp]) -> None:
        self.ops = ops
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            works, acks, ack_buffers = [], [], []
            for op in self.ops:
                works.append(op.op(op.tensor, op.peer, op.group, op.tag))
                if op.op is dist.isend:  # the send ends when the peer has received it
                    ack_buffers.append(torch.zeros(1, dtype=torch.uint8))
                    acks.append(dist.irecv(ack_buffers[-1], op.peer, op.group, op.tag + ACK_TAG_OFFSET))
            for op, work in zip(self.ops, works, strict=True):  # a gloo work is waited for once only
                if op.op is dist.irecv:
                    work.wait()
                    dist.send(torch.ones(1, dtype=torch.uint8), op.peer, op.group, op.tag + ACK_TAG_OFFSET)
            for op, work in zip(self.ops, works, strict=True):
                if op.op is dist.isend:
                    work.wait()
            for ack in acks:
                ack.wait()
        except BaseException as error:  # handed to the thread that waits
            self.error = error
        finally:
            self.done.set()


class _BatchWork:
    """What the executor waits on: every part of one batch (the group completes as a whole, as on NCCL)."""

    def __init__(self, parts: list[_Batch]) -> None:
        self.parts = parts

    def wait(self) -> bool:
        for part in self.parts:
            part.done.wait()
            if part.error is not None:
                raise RuntimeError(f"emulated NCCL transfer failed: {part.error}") from part.error
        return True


class NcclStreamLink(PeerLink):
    """:class:`~lightning_bfpp.run.p2p.PeerLink` over gloo with NCCL's ordering (see the module docstring): one stream
    (worker thread) for all the peers of a rank, as the group communicator that ``batch_isend_irecv`` uses."""

    emulates_nccl = True

    def __init__(self, group: dist.ProcessGroup, num_micro_batches: int, device: torch.device) -> None:
        super().__init__(group, num_micro_batches, device)
        self._stream: queue.SimpleQueue[_Batch] = queue.SimpleQueue()
        threading.Thread(target=_worker, args=(self._stream,), daemon=True).start()

    def _start(self, transfers: list[Transfer]) -> list[dist.Work]:
        batch = _Batch([as_p2p_op(transfer, self.group) for transfer in transfers])
        self._stream.put(batch)
        return [_BatchWork([batch])]  # type: ignore[list-item]


def _worker(batches: queue.SimpleQueue[_Batch]) -> None:
    while True:
        batches.get().run()
