"""Shape headers travel only in the first step of each batch shape; a step whose batch shapes were seen before sends
none, and the receiver allocates from the shapes it remembers (the executor with a recording link, in-process)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_bfpp.plan.schedule import build_schedule
from lightning_bfpp.run.executor import MAX_KNOWN_SHAPES, PipelineExecutor
from lightning_bfpp.run.p2p import StageIOMeta, TensorMeta


class _Pending:
    def __init__(self, buffers: list[torch.Tensor]) -> None:
        self.buffers = buffers

    def wait(self) -> list[torch.Tensor]:
        return self.buffers


class RecordingLink:
    """Stands in for a PeerLink: records headers and the shapes of the buffers posted; a receive gets zeros."""

    def __init__(self, header: StageIOMeta | None = None) -> None:
        self.header = header  # what recv_header returns
        self.sent_headers: list[StageIOMeta] = []
        self.received_headers = 0
        self.recv_shapes: list[tuple[int, ...]] = []

    def send(self, tensors: Any, kind: int, stage: int, micro_batch: int, peer: int) -> None:
        pass

    def recv(self, metas: Any, kind: int, stage: int, micro_batch: int, peer: int) -> _Pending:
        self.recv_shapes += [m.shape for m in metas]
        return _Pending([torch.zeros(m.shape, dtype=m.dtype) for m in metas])

    def send_header(self, meta: StageIOMeta, stage: int, peer: int) -> None:
        self.sent_headers.append(meta)

    def recv_header(self, stage: int, peer: int) -> StageIOMeta:
        self.received_headers += 1
        assert self.header is not None
        return self.header

    def issue(self) -> None:
        pass

    def wait_sends(self) -> None:
        pass

    def discard(self) -> None:
        pass


SCHEDULE = build_schedule("breadth_first", 2, 1, 2, forward_only=True)


def _sender_step(executor: PipelineExecutor, width: int, key: Any) -> None:
    with torch.no_grad():  # a forward-only schedule, as evaluation runs it
        executor.run(lambda stage, m, x: torch.ones(2, width), lambda m, out: None, shapes_key=key)


def test_the_sender_sends_the_shapes_once_per_batch_shape() -> None:
    link = RecordingLink()
    executor = PipelineExecutor(SCHEDULE, 0, link)  # type: ignore[arg-type]
    _sender_step(executor, 3, "short")
    assert [m.tensors[0].shape for m in link.sent_headers] == [(2, 3)]
    _sender_step(executor, 3, "short")  # the same batch shapes: no header
    _sender_step(executor, 5, "long")  # new batch shapes: a header
    _sender_step(executor, 3, "short")  # seen before: none
    assert [m.tensors[0].shape for m in link.sent_headers] == [(2, 3), (2, 5)]
    _sender_step(executor, 3, None)  # no key: a header every step
    assert len(link.sent_headers) == 3


def test_outputs_that_change_shape_under_the_same_batch_shapes_are_refused() -> None:
    """Outputs whose shapes depend on the batch's values: the receiver would allocate the remembered shapes, so the
    sender refuses before sending anything."""
    executor = PipelineExecutor(SCHEDULE, 0, RecordingLink())  # type: ignore[arg-type]
    _sender_step(executor, 3, "k")
    with pytest.raises(ValueError, match=r"must depend only on the shapes of the batch") as info:
        _sender_step(executor, 4, "k")
    assert "(2, 4)" in str(info.value) and "(2, 3)" in str(info.value)


def test_the_receiver_reads_the_shapes_once_per_batch_shape() -> None:
    header = StageIOMeta(False, (TensorMeta(torch.float32, (2, 3)),))
    link = RecordingLink(header)
    executor = PipelineExecutor(SCHEDULE, 1, link)  # type: ignore[arg-type]
    outputs: list[torch.Tensor] = []

    def step(key: Any) -> None:
        with torch.no_grad():
            executor.run(lambda stage, m, x: x, lambda m, out: outputs.append(out), shapes_key=key)

    step("a")
    step("a")
    step("a")
    assert link.received_headers == 1  # the first step only: no host read after it
    assert link.recv_shapes == [(2, 3)] * 6 and all(o.shape == (2, 3) for o in outputs)
    step("b")
    assert link.received_headers == 2


def test_the_oldest_batch_shapes_are_forgotten_first() -> None:
    link = RecordingLink()
    executor = PipelineExecutor(SCHEDULE, 0, link)  # type: ignore[arg-type]
    for key in range(MAX_KNOWN_SHAPES + 1):  # key 0 is forgotten
        _sender_step(executor, 3, key)
    _sender_step(executor, 3, MAX_KNOWN_SHAPES)
    assert len(link.sent_headers) == MAX_KNOWN_SHAPES + 1
    _sender_step(executor, 3, 0)
    assert len(link.sent_headers) == MAX_KNOWN_SHAPES + 2


def test_batch_shapes_key_sees_shapes_not_values() -> None:
    from lightning_bfpp.run.microbatch import batch_shapes_key

    def batch(n: int, fill: float, seq: int = 4) -> list[dict[str, Any]]:
        return [{"x": torch.full((n, seq), fill), "name": "a", "len": seq, "scale": fill}] * 2

    assert batch_shapes_key(batch(2, 0.0)) == batch_shapes_key(batch(2, 1.0))  # values do not matter
    assert batch_shapes_key(batch(2, 0.0)) != batch_shapes_key(batch(3, 0.0))
    assert batch_shapes_key(batch(2, 0.0, seq=4)) != batch_shapes_key(batch(2, 0.0, seq=5))
    assert batch_shapes_key(batch(2, 0.0)) != batch_shapes_key(batch(2, 0.0)[:1])
