"""Point-to-point transfer of stage activations and their gradients between pipeline ranks.

A stage boundary sends a small header that describes the tensors (tuple or not, dtype and shape of each) before its
first activation of a step whose batch has shapes the boundary has not seen yet (see
:class:`~lightning_bfpp.run.executor.PipelineExecutor`): both ranks of a boundary see the same batches, so both know
without a message whether a header comes. A step whose batch shapes were seen before sends none, and the receiver
allocates from the shapes it remembers, without waiting on the host. Gradients need no header: the receiver produced
the activations they belong to.

Every transfer of a communication group is posted as one ``batch_isend_irecv`` on the pipeline group's communicator
(on NCCL: one stream for all peers, transfers run in issue order); gloo matches by tag, and there each transfer is
started on the group directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_bfpp.run.host_sync import host_values, to_device

MAX_TENSORS = 16
MAX_DIMS = 8
HEADER_LEN = 2 + MAX_TENSORS * (2 + MAX_DIMS)
DTYPES = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)  # fmt: skip
KIND_ACT, KIND_GRAD, KIND_HEADER = 0, 1, 2
KIND_NAMES = ("activations", "gradients", "the shapes of the activations")


class TransferError(RuntimeError):
    """A send or receive to or from global rank ``peer`` failed: that process died, or did not answer in time
    (``peer`` is None when a batch with several peers could not be posted)."""

    def __init__(self, message: str, peer: int | None) -> None:
        super().__init__(message)
        self.peer = peer


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver needs to allocate one activation: its dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StageIOMeta:
    """The structure of a stage's output: a single tensor or a tuple of tensors."""

    is_tuple: bool
    tensors: tuple[TensorMeta, ...]

    @staticmethod
    def of(tensors: Sequence[Tensor], is_tuple: bool) -> StageIOMeta:
        return StageIOMeta(is_tuple, tuple(TensorMeta(t.dtype, tuple(t.shape)) for t in tensors))

    def encode(self, device: torch.device) -> Tensor:
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[0], header[1] = int(self.is_tuple), len(self.tensors)
        for i, meta in enumerate(self.tensors):
            base = 2 + i * (2 + MAX_DIMS)
            header[base], header[base + 1] = DTYPES.index(meta.dtype), len(meta.shape)
            header[base + 2 : base + 2 + len(meta.shape)] = torch.tensor(meta.shape, dtype=torch.int64)
        return to_device(header, device)

    @staticmethod
    def decode(header: Tensor) -> StageIOMeta:
        values = host_values(header)
        tensors = []
        for i in range(values[1]):
            base = 2 + i * (2 + MAX_DIMS)
            ndim = values[base + 1]
            tensors.append(TensorMeta(DTYPES[values[base]], tuple(values[base + 2 : base + 2 + ndim])))
        return StageIOMeta(bool(values[0]), tuple(tensors))


def check_stage_outputs(outputs: object, stage: int) -> None:
    """Raises a clear error unless a stage returned a tensor or a tuple of tensors the header can describe."""
    items = outputs if isinstance(outputs, tuple) else (outputs,)
    if not items or not all(isinstance(t, Tensor) for t in items):
        raise TypeError(
            f"Stage {stage} returned {type(outputs).__name__}: a pipeline layer must return a tensor or a tuple of "
            "tensors (put other values in the batch, which every stage can read)."
        )
    if len(items) > MAX_TENSORS or any(t.dim() > MAX_DIMS for t in items):
        raise ValueError(
            f"Stage {stage} returned more than {MAX_TENSORS} tensors or one with more than {MAX_DIMS} dims."
        )
    if any(t.dtype not in DTYPES for t in items):
        raise TypeError(f"Stage {stage} returned a tensor of an unsupported dtype; supported: {DTYPES}.")


class Transfer(NamedTuple):
    """One send or receive of a batch; ``peer`` is the global rank."""

    is_send: bool
    tensor: Tensor
    peer: int
    tag: int


class PeerLink:
    """Sends and receives to the pipeline neighbours of one rank, with unique tags per message.

    :meth:`send` and :meth:`recv` add transfers to a batch, which :meth:`issue` starts as one ``batch_isend_irecv``
    (on NCCL the transfers between two ranks run in issue order, and a batch is posted at once). Gloo matches by tag
    and has no groups: there each transfer is started on the process group directly, without the per-operation
    Python of ``batch_isend_irecv``.
    """

    emulates_nccl: ClassVar[bool] = False
    """True for a link that runs transfers over gloo in NCCL's order (:mod:`lightning_bfpp.run.nccl_order_link`)."""

    def __init__(self, group: dist.ProcessGroup, num_micro_batches: int, device: torch.device) -> None:
        self.group = group
        self.num_micro_batches = num_micro_batches
        self.device = device
        self._global_ranks = [dist.get_global_rank(group, r) for r in range(dist.get_world_size(group))]
        self._group_ranks = {g: r for r, g in enumerate(self._global_ranks)}
        self._direct = dist.get_backend(group) == "gloo" and not self.emulates_nccl
        self._pending_sends: list[tuple[dist.Work, tuple[int, int, int], int]] = []
        self._send_buffers: list[Tensor] = []  # kept alive until wait_sends
        self._ops: list[Transfer] = []
        self._batch_sends: list[tuple[int, int, tuple[int, int, int], int]] = []  # (first op, end op, message, peer)
        self._batch_recvs: list[tuple[int, int, PendingRecv]] = []

    def _tag(self, kind: int, stage: int, micro_batch: int, index: int) -> int:
        return ((stage * self.num_micro_batches + micro_batch) * 3 + kind) * MAX_TENSORS + index

    def send(self, tensors: Sequence[Tensor], kind: int, stage: int, micro_batch: int, peer: int) -> None:
        """Adds the sending of ``tensors`` to the batch; the buffers are kept alive until :meth:`wait_sends`."""
        first = len(self._ops)
        for index, tensor in enumerate(tensors):
            buffer = tensor.detach().contiguous()
            tag = self._tag(kind, stage, micro_batch, index)
            self._ops.append(Transfer(True, buffer, self._global_ranks[peer], tag))
            self._send_buffers.append(buffer)
        self._batch_sends.append((first, len(self._ops), (kind, stage, micro_batch), self._global_ranks[peer]))

    def recv(self, metas: Sequence[TensorMeta], kind: int, stage: int, micro_batch: int, peer: int) -> PendingRecv:
        """Adds the receives of one message to the batch; :meth:`PendingRecv.wait`, after :meth:`issue`, returns
        the tensors."""
        first, buffers = len(self._ops), []
        for index, meta in enumerate(metas):
            buffer = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
            tag = self._tag(kind, stage, micro_batch, index)
            self._ops.append(Transfer(False, buffer, self._global_ranks[peer], tag))
            buffers.append(buffer)
        pending = PendingRecv([], buffers, (kind, stage, micro_batch), self._global_ranks[peer])
        self._batch_recvs.append((first, len(self._ops), pending))
        return pending

    def issue(self) -> None:
        """Starts the batch of transfers added since the last call, as one group."""
        if not self._ops:
            return
        try:
            works = self._start(self._ops)
        except RuntimeError as error:  # posting failed: a peer's connection is gone
            peers = sorted({op.peer for op in self._ops})
            named = f"global rank {peers[0]}" if len(peers) == 1 else f"global ranks {', '.join(map(str, peers))}"
            lost = peers[0] if len(peers) == 1 else None
            raise TransferError(f"posting transfers with {named} failed: {error}", lost) from error
        per_op = len(works) == len(self._ops)  # gloo: one work per transfer; NCCL: one for the whole group

        def works_of(first: int, end: int) -> list[dist.Work]:
            return works[first:end] if per_op else works

        for first, end, message, peer in self._batch_sends:
            self._pending_sends += [(work, message, peer) for work in works_of(first, end)]
        for first, end, pending in self._batch_recvs:
            pending.works = works_of(first, end)
        self._ops, self._batch_sends, self._batch_recvs = [], [], []

    def _start(self, ops: list[Transfer]) -> list[dist.Work]:
        if self._direct:
            group, ranks = self.group, self._group_ranks
            return [
                group.send([op.tensor], ranks[op.peer], op.tag)
                if op.is_send
                else group.recv([op.tensor], ranks[op.peer], op.tag)
                for op in ops
            ]
        return dist.batch_isend_irecv([as_p2p_op(op, self.group) for op in ops])

    def send_header(self, meta: StageIOMeta, stage: int, peer: int) -> None:
        """Adds the header of ``stage``'s input boundary to the batch."""
        self.send([meta.encode(self.device)], KIND_HEADER, stage, 0, peer)

    def recv_header(self, stage: int, peer: int) -> StageIOMeta:
        """Receives the header of ``stage``'s input boundary on its own, before the batch being built."""
        ops, sends, recvs = self._ops, self._batch_sends, self._batch_recvs
        self._ops, self._batch_sends, self._batch_recvs = [], [], []
        try:
            pending = self.recv([TensorMeta(torch.int64, (HEADER_LEN,))], KIND_HEADER, stage, 0, peer)
            self.issue()
        finally:
            self._ops, self._batch_sends, self._batch_recvs = ops, sends, recvs
        return StageIOMeta.decode(pending.wait()[0])

    def discard(self) -> None:
        """Forgets the transfers of a failed step: the batch being built and the sends not waited for."""
        self._ops, self._batch_sends, self._batch_recvs = [], [], []
        self._pending_sends.clear()
        self._send_buffers.clear()

    def wait_sends(self) -> None:
        for work, message, peer in self._pending_sends:
            _wait(work, "sending", message, peer)
        self._pending_sends.clear()
        self._send_buffers.clear()


def as_p2p_op(transfer: Transfer, group: dist.ProcessGroup) -> dist.P2POp:
    """The ``torch.distributed`` operation of ``transfer``."""
    op = dist.isend if transfer.is_send else dist.irecv
    return dist.P2POp(op, transfer.tensor, transfer.peer, group, transfer.tag)


class PendingRecv:
    """Receives posted for one message."""

    def __init__(self, works: list[dist.Work], buffers: list[Tensor], message: tuple[int, int, int], peer: int) -> None:
        self.works, self.buffers, self.message, self.peer = works, buffers, message, peer

    def wait(self) -> list[Tensor]:
        for work in self.works:
            _wait(work, "receiving", self.message, self.peer)
        return self.buffers


def _label(kind: int, stage: int, micro_batch: int) -> str:
    if kind == KIND_HEADER:
        return f"{KIND_NAMES[kind]} of stage {stage}"
    return f"{KIND_NAMES[kind]} of stage {stage}, micro-batch {micro_batch}"


def _wait(work: dist.Work, action: str, message: tuple[int, int, int], peer: int) -> None:
    """Waits for a transfer; a failure names the message (``(kind, stage, micro_batch)``, formatted only then)."""
    try:
        work.wait()
    except RuntimeError as error:
        direction = "to" if action == "sending" else "from"
        what = f"{action} {_label(*message)} {direction} global rank {peer}"
        raise TransferError(f"{what} failed: {error}", peer) from error
