"""Runs one pipeline rank's action list: point-to-point transfers, autograd per stage and micro-batch.

The executor knows nothing about Lightning: the caller hands it the stage computations as functions.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_bfpp.plan.schedule import Action, ActionKind, Schedule, communication_groups
from lightning_bfpp.plan.timeline import TimedEvent
from lightning_bfpp.plan.weight_flush import validate_weight_flush
from lightning_bfpp.run.data_parallel import DataParallel
from lightning_bfpp.run.p2p import (
    KIND_ACT,
    KIND_GRAD,
    PeerLink,
    PendingRecv,
    StageIOMeta,
    TensorMeta,
    check_stage_outputs,
)

StageIO = Tensor | tuple[Tensor, ...]
ForwardFn = Callable[[int, int, StageIO | None], StageIO]
"""``forward(stage, micro_batch, inputs)``: runs a stage; ``inputs`` is None for the first stage."""
LastStageFn = Callable[[int, StageIO], Tensor | None]
"""``last(micro_batch, outputs)``: consumes the last stage's outputs; returns the loss to back-propagate, or None."""


class DeferredWeightGradients(Protocol):
    """Weight gradients computed once per run of a stage's backwards (see :mod:`lightning_bfpp.run.weight_grad`)."""

    def flush(self, stage: int) -> None:
        """Adds the weight gradients of ``stage``'s finished backwards to ``.grad``."""

    def discard(self) -> None:
        """Drops what a failed step left deferred."""


@dataclass
class StepState:
    """Everything one step keeps alive; dropped when the step ends. Keys are (stage, micro_batch)."""

    inputs: dict[tuple[int, int], tuple[Tensor, ...]] = field(default_factory=dict)
    outputs: dict[tuple[int, int], tuple[Tensor, ...]] = field(default_factory=dict)
    input_is_tuple: dict[tuple[int, int], bool] = field(default_factory=dict)
    output_is_tuple: dict[tuple[int, int], bool] = field(default_factory=dict)
    losses: dict[int, Tensor] = field(default_factory=dict)
    output_grads: dict[tuple[int, int], list[Tensor]] = field(default_factory=dict)
    input_grads: dict[tuple[int, int], list[Tensor]] = field(default_factory=dict)
    act_recvs: dict[tuple[int, int], PendingRecv] = field(default_factory=dict)
    grad_recvs: dict[tuple[int, int], PendingRecv] = field(default_factory=dict)
    input_metas: dict[int, StageIOMeta] = field(default_factory=dict)
    sent_metas: dict[int, StageIOMeta] = field(default_factory=dict)
    known_metas: dict[int, StageIOMeta] = field(default_factory=dict)  # by boundary, from earlier steps
    new_metas: dict[int, StageIOMeta] = field(default_factory=dict)  # by boundary, learned by a header this step

    def leftovers(self) -> list[str]:
        """Tensors or receives that a complete step should have consumed: activations, gradients, pending recvs."""
        names = ("inputs", "outputs", "output_grads", "input_grads", "act_recvs", "grad_recvs")
        return [f"{name}{sorted(getattr(self, name))}" for name in names if getattr(self, name)]


MAX_KNOWN_SHAPES = 64
"""Batch shapes whose boundary shapes an executor remembers (the least recently used are forgotten first, in the
same order on every rank, since every rank sees the same batches)."""


def _as_tuple(value: StageIO) -> tuple[Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def _needs_grad(tensor: Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def _as_leaves(tensors: tuple[Tensor, ...] | list[Tensor]) -> tuple[Tensor, ...]:
    """Received (or locally handed over) activations: leaves that collect the gradient of the stage input."""
    grad = torch.is_grad_enabled()
    return tuple(t.requires_grad_() if grad and _needs_grad(t) else t for t in tensors)


class PipelineExecutor:
    """Walks the action list of ``rank`` in ``schedule`` for one step.

    Arguments:
        schedule: the validated global schedule.
        rank: this process's pipeline rank.
        link: the point-to-point link to the other pipeline ranks (None when ``pipeline_size == 1``). Each
            communication group of the schedule (:func:`~lightning_bfpp.plan.schedule.communication_groups`) is issued
            as one batch. The first step of each batch shape learns each boundary's shapes from a header: at the
            boundary's first receive the transfers of the group before it are issued, and the header received (and
            read on the host) on its own. Later steps with the same batch shapes (``shapes_key`` of :meth:`run`) send
            no header and read nothing on the host: the receiver allocates from the shapes it remembers, and the
            sender checks on the host (from tensor metadata, without a device read) that its outputs still have them.
        data_parallel: what the data-parallel mode does at the schedule's GATHER, RESHARD and REDUCE_GRAD actions and
            around each backward (see :class:`~lightning_bfpp.run.data_parallel.DataParallel`); None when there is
            nothing to do.
        weight_gradients: deferred weight gradients, added to ``.grad`` at the schedule's BACKWARD_WEIGHT actions
            (see :mod:`lightning_bfpp.plan.weight_flush`, which checks that the schedule has them).
    """

    def __init__(
        self,
        schedule: Schedule,
        rank: int,
        link: PeerLink | None,
        data_parallel: DataParallel | None = None,
        weight_gradients: DeferredWeightGradients | None = None,
    ) -> None:
        self.schedule = schedule
        self.rank = rank
        self.link = link
        self.data_parallel = data_parallel
        if weight_gradients is not None and not schedule.forward_only:
            validate_weight_flush(schedule)  # a backward without its flush would leave its weight gradients out
        self.weight_gradients = weight_gradients
        self.events: list[TimedEvent] | None = None  # set to a list to record when each action runs
        self.actions: tuple[Action, ...] = schedule.actions[rank]
        self.last_stage = schedule.num_stages - 1
        self._handlers = {
            ActionKind.RECV_ACT: self._recv_act,
            ActionKind.FORWARD: self._forward,
            ActionKind.SEND_ACT: self._send_act,
            ActionKind.RECV_GRAD: self._recv_grad,
            ActionKind.BACKWARD: self._backward,
            ActionKind.SEND_GRAD: self._send_grad,
            ActionKind.REDUCE_GRAD: self._reduce_grad,
            ActionKind.GATHER: self._gather,
            ActionKind.RESHARD: self._reshard,
            ActionKind.BACKWARD_WEIGHT: self._backward_weight,
        }
        # the micro-batch of each stage's last backward: gradients are synchronised after it
        self._last_backward = {a.stage: a.micro_batch for a in self.actions if a.kind is ActionKind.BACKWARD}
        # what run() does, in order, built once: (function, argument, timeline label, timeline category)
        self._program: list[tuple[Callable[[Any], None], Any, str, str]] = []
        self._known_shapes: OrderedDict[Hashable, dict[int, StageIOMeta]] = OrderedDict()
        group_ends = {group[-1]: group for group in communication_groups(self.actions)}
        for i, action in enumerate(self.actions):
            if action.kind is not ActionKind.GROUP_END:  # a marker: nothing to run
                self._program.append((self._handlers[action.kind], action, str(action), action.kind.name.lower()))
            if i in group_ends:  # the group's transfers were added to the link's batch: start them together
                label = "issue " + " ".join(str(self.actions[j]) for j in group_ends[i])
                self._program.append((self._issue, None, label, "issue"))

    def run(
        self,
        forward: ForwardFn,
        last: LastStageFn,
        loss_scale: float | Tensor = 1.0,
        before_first_backward: Callable[[], None] | None = None,
        shapes_key: Hashable | None = None,
    ) -> list[Tensor]:
        """Runs the step; returns the detached losses of the micro-batches (empty unless this rank holds the last
        stage). Gradients accumulate into the parameters' ``.grad``, scaled by ``loss_scale`` (a number or a scalar
        tensor); ``before_first_backward`` (e.g. zeroing the gradients) runs right before the step's first backward.

        ``shapes_key`` describes the shapes of the step's batch (the same on every rank of the pipeline, e.g.
        :func:`~lightning_bfpp.run.microbatch.batch_shapes_key`): a step whose key an earlier step had sends no shape
        headers. None: headers every step."""
        self._forward_fn, self._last_fn, self._loss_scale = forward, last, loss_scale
        self._before_first_backward = before_first_backward
        self._state = StepState()
        if shapes_key is not None and shapes_key in self._known_shapes:
            self._state.known_metas = self._known_shapes[shapes_key]
        completed = False
        try:
            if self.events is None:
                for fn, arg, _, _ in self._program:
                    fn(arg)
            else:
                for fn, arg, label, category in self._program:
                    start = time.perf_counter()
                    fn(arg)
                    self.events.append(TimedEvent(label, category, start, time.perf_counter()))
            completed = True
            if self.link is not None:
                self.link.wait_sends()
            leftovers = self._state.leftovers()
            if leftovers:
                raise RuntimeError(f"The schedule left {leftovers} behind on pipeline rank {self.rank}: it is invalid.")
            if shapes_key is not None:
                self._remember_shapes(shapes_key, self._state.new_metas)
            return [self._state.losses[m] for m in sorted(self._state.losses)]
        finally:
            if not completed and self.weight_gradients is not None:
                self.weight_gradients.discard()
            if not completed and self.link is not None:
                self.link.discard()
            self._state = StepState()
            self._forward_fn = self._last_fn = None  # type: ignore[assignment]
            self._before_first_backward = None

    def _remember_shapes(self, key: Hashable, learned: dict[int, StageIOMeta]) -> None:
        known = self._known_shapes.setdefault(key, {})
        known.update(learned)
        self._known_shapes.move_to_end(key)
        while len(self._known_shapes) > MAX_KNOWN_SHAPES:
            self._known_shapes.popitem(last=False)

    def _wait(self, pending: PendingRecv, label: str) -> list[Tensor]:
        if self.events is None:
            return pending.wait()
        start = time.perf_counter()
        tensors = pending.wait()
        self.events.append(TimedEvent(label, "wait", start, time.perf_counter()))
        return tensors

    def _peer(self, stage: int) -> int:
        return self.schedule.rank_of(stage)

    def _issue(self, _: None) -> None:
        assert self.link is not None
        self.link.issue()

    # forward ---------------------------------------------------------------------------------------------------
    def _recv_act(self, action: Action) -> None:
        state, stage, m = self._state, action.stage, action.micro_batch
        assert self.link is not None
        peer = self._peer(stage - 1)
        if stage not in state.input_metas and stage in state.known_metas:  # shapes seen before: no header
            state.input_metas[stage] = state.known_metas[stage]
        if stage not in state.input_metas:  # the boundary's first receive: the group so far, then the shapes
            self.link.issue()
            start = time.perf_counter()
            state.input_metas[stage] = state.new_metas[stage] = self.link.recv_header(stage, peer)
            if self.events is not None:
                self.events.append(TimedEvent(f"header {stage}", "wait", start, time.perf_counter()))
        state.act_recvs[(stage, m)] = self.link.recv(state.input_metas[stage].tensors, KIND_ACT, stage, m, peer)

    def _take_input(self, stage: int, micro_batch: int) -> StageIO | None:
        state, key = self._state, (stage, micro_batch)
        if stage == 0:
            return None
        if key not in state.inputs:  # not handed over locally: wait for the message
            state.inputs[key] = _as_leaves(self._wait(state.act_recvs.pop(key), f"wait act {stage}.{micro_batch}"))
            state.input_is_tuple[key] = state.input_metas[stage].is_tuple
        tensors = state.inputs[key]
        if not torch.is_grad_enabled():
            del state.inputs[key]
        return tensors if state.input_is_tuple.pop(key) else tensors[0]

    def _forward(self, action: Action) -> None:
        state, stage, m = self._state, action.stage, action.micro_batch
        outputs = self._forward_fn(stage, m, self._take_input(stage, m))
        if stage == self.last_stage:
            loss = self._last_fn(m, outputs)
            if loss is not None:
                state.losses[m] = loss.detach()
                if torch.is_grad_enabled():
                    state.outputs[(stage, m)] = (loss * self._loss_scale,)
            return
        check_stage_outputs(outputs, stage)
        tensors, is_tuple = _as_tuple(outputs), isinstance(outputs, tuple)
        if self._peer(stage + 1) == self.rank:  # next stage on this rank: hand over without communication
            state.inputs[(stage + 1, m)] = _as_leaves(tuple(t.detach() for t in tensors))
            state.input_is_tuple[(stage + 1, m)] = is_tuple
            if not torch.is_grad_enabled():
                return
        state.outputs[(stage, m)] = tensors
        state.output_is_tuple[(stage, m)] = is_tuple

    def _send_act(self, action: Action) -> None:
        state, stage, m = self._state, action.stage, action.micro_batch
        assert self.link is not None
        tensors = state.outputs[(stage, m)] if torch.is_grad_enabled() else state.outputs.pop((stage, m))
        meta = StageIOMeta.of(tensors, state.output_is_tuple[(stage, m)])
        if not torch.is_grad_enabled():
            del state.output_is_tuple[(stage, m)]
        peer = self._peer(stage + 1)
        if stage + 1 not in state.sent_metas:
            state.sent_metas[stage + 1] = meta
            known = state.known_metas.get(stage + 1)
            if known is None:
                state.new_metas[stage + 1] = meta
                self.link.send_header(meta, stage + 1, peer)
            elif known != meta:
                raise ValueError(
                    f"Stage {stage} produced outputs of shapes {meta}, but an earlier step with a batch of the same "
                    f"shapes gave {known}: bfpp sends a stage's output shapes only when the batch's shapes change, "
                    "so the outputs' shapes must depend only on the shapes of the batch (pad data-dependent sizes "
                    "to a fixed size, or make the size visible in the batch's shapes)."
                )
        elif state.sent_metas[stage + 1] != meta:
            raise ValueError(
                f"Stage {stage} produced outputs of different shapes within one step ({state.sent_metas[stage + 1]} "
                f"then {meta}): every micro-batch of a step must have the same shapes."
            )
        self.link.send(tensors, KIND_ACT, stage + 1, m, peer)

    # backward --------------------------------------------------------------------------------------------------
    def _recv_grad(self, action: Action) -> None:
        state, stage, m = self._state, action.stage, action.micro_batch
        assert self.link is not None
        metas = [TensorMeta(t.dtype, tuple(t.shape)) for t in state.outputs[(stage, m)] if _needs_grad(t)]
        state.grad_recvs[(stage, m)] = self.link.recv(metas, KIND_GRAD, stage + 1, m, self._peer(stage + 1))

    def _backward(self, action: Action) -> None:
        state, stage, m = self._state, action.stage, action.micro_batch
        key = (stage, m)
        outputs = state.outputs.pop(key)
        state.output_is_tuple.pop(key, None)
        if self._before_first_backward is not None:
            self._before_first_backward()
            self._before_first_backward = None
        if self.data_parallel is not None:
            self.data_parallel.before_backward(stage, self._last_backward[stage] == m)
        if stage == self.last_stage:
            torch.autograd.backward(outputs[0])
        else:
            if key in state.output_grads:
                grads = state.output_grads.pop(key)
            else:
                grads = self._wait(state.grad_recvs.pop(key), f"wait grad {stage}.{m}")
            differentiable = [t for t in outputs if _needs_grad(t)]
            pairs = [(t, g) for t, g in zip(differentiable, grads, strict=True) if t.requires_grad]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        if stage > 0:
            inputs = state.inputs.pop(key)
            grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs if _needs_grad(t)]
            if self._peer(stage - 1) == self.rank:
                state.output_grads[(stage - 1, m)] = grads
            else:
                state.input_grads[key] = grads

    def _send_grad(self, action: Action) -> None:
        assert self.link is not None
        stage, m = action.stage, action.micro_batch
        grads = self._state.input_grads.pop((stage, m))
        self.link.send(grads, KIND_GRAD, stage, m, self._peer(stage - 1))

    def _backward_weight(self, action: Action) -> None:
        if self.weight_gradients is not None:
            self.weight_gradients.flush(action.stage)

    def _reduce_grad(self, action: Action) -> None:
        if self.data_parallel is not None:
            self.data_parallel.backward_done(action.stage)

    # parameters ------------------------------------------------------------------------------------------------
    def _gather(self, action: Action) -> None:
        if self.data_parallel is not None:
            self.data_parallel.gather(action.stage)

    def _reshard(self, action: Action) -> None:
        if self.data_parallel is not None:
            self.data_parallel.reshard(action.stage)
