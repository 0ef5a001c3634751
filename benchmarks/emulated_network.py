"""What stands in for GPUs and their network in ``emulated_cluster.py``: kernels that sleep, a pipeline link with
NCCL's ordering and a stated network's transfer times, and data-parallel reductions that take the stated time.

- :class:`EmulatedLayer`: one transformer layer of the emulated model. Its forward and backward sleep a prescribed
  time (the CPU stays free); a tiny ``nn.Linear`` gives it real parameters and lets ``weight_gradients="batched"``
  defer its weight gradient, whose batched product then sleeps the prescribed ``W`` time (:func:`install`).
- :class:`EmulatedLink`: :class:`~lightning_bfpp.run.nccl_order_link.NcclOrderLink`, which runs each rank's
  transfers as NCCL does (one stream per rank, the groups in issue order, a receive done when its data arrives, a
  send when the peer has received it), with every transfer lasting ``latency + bytes / bandwidth`` of the stated
  network from the moment both sides have posted it.
- Data-parallel reductions (the asynchronous ``all_reduce`` of each stage's gradients) run for real on gloo and end
  no earlier than a ring all-reduce of the emulated gradient bytes would, one after another on the rank's
  communication stream (:func:`install`).

Every time is the stated one times ``Network.time_scale`` (the emulated clock runs slower than the GPUs').
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_bfpp.run.nccl_order_link import NcclOrderLink
from lightning_bfpp.run.weight_grad import _DEFERRED_ATTRIBUTE, _DeferredWeightGrad

LINEAR_WIDTH = 16  # the tiny Linear of a layer: LINEAR_WIDTH^2 real parameters stand for a layer's parameters


@dataclass(frozen=True)
class Network:
    """The stated network, in the planner's units (seconds, bytes, bytes/s), and the emulation's time scale.

    Arguments:
        time_scale: emulated seconds per stated second (kernels, transfers and reductions alike).
        p2p_latency: latency of one pipeline transfer.
        boundary_bytes: bytes of one activation (and of its gradient) between two stages.
        intra_node_bandwidth, inter_node_bandwidth: bytes/s of a pipeline link inside a node and across nodes.
        gpus_per_node: global ranks ``n * gpus_per_node ...`` share node ``n``.
        dp_size: data-parallel replicas; their reductions are delayed.
        dp_latency, dp_bandwidth: the ring all-reduce's latency and bus bandwidth.
        grad_bytes_per_element: emulated gradient bytes one real gradient element stands for.
    """

    time_scale: float
    p2p_latency: float
    boundary_bytes: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    gpus_per_node: int
    dp_size: int
    dp_latency: float
    dp_bandwidth: float
    grad_bytes_per_element: float

    def transfer_seconds(self, tensor: Tensor, src: int, dst: int) -> float:
        """Emulated time of one transfer from global rank ``src`` to ``dst``: an activation or its gradient costs
        the boundary's bytes; a small integer tensor (a shape header) costs the latency alone."""
        seconds = self.p2p_latency
        if tensor.is_floating_point():
            same_node = src // self.gpus_per_node == dst // self.gpus_per_node
            seconds += self.boundary_bytes / (self.intra_node_bandwidth if same_node else self.inter_node_bandwidth)
        return self.time_scale * seconds

    def all_reduce_seconds(self, numel: int) -> float:
        """Emulated time of a ring all-reduce of ``numel`` real gradient elements."""
        share = 2 * (self.dp_size - 1) / self.dp_size
        return self.time_scale * (self.dp_latency + share * numel * self.grad_bytes_per_element / self.dp_bandwidth)


NETWORK: list[Network] = []  # set by install(): the link class is built by the strategy, without arguments of ours
SLEPT = {"kernels": 0.0, "late": 0.0, "count": 0}  # this process's emulated kernel time, and how late sleeps woke


def sleep_for(seconds: float) -> None:
    """Sleeps ``seconds`` (an emulated kernel) and records how late the sleep woke up."""
    if seconds <= 0:
        return
    deadline = time.perf_counter() + seconds
    time.sleep(seconds)
    SLEPT["kernels"] += seconds
    SLEPT["late"] += max(0.0, time.perf_counter() - deadline)
    SLEPT["count"] += 1


class _Sleep(torch.autograd.Function):
    """Identity on the activations whose forward and backward sleep; the backward sleeps less by the weight-gradient
    time when the layer's Linear defers its weight gradient (``weight_gradients="batched"``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: EmulatedLayer) -> Tensor:
        ctx.backward_s = layer.backward_s
        if _DEFERRED_ATTRIBUTE in layer.linear.__dict__:
            ctx.backward_s -= layer.weight_s
        sleep_for(layer.forward_s)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        sleep_for(ctx.backward_s)
        return grad, None


class EmulatedLayer(nn.Module):
    """One layer: ``forward_s`` and ``backward_s`` of sleep, of which ``weight_s`` is its weight gradient;
    ``batched_weight_s(n)`` the time of one batched weight-gradient product over ``n`` backwards; ``extra_params``
    more real parameters (an embedding or the logits' weight held with the layer)."""

    def __init__(self, forward_s: float, backward_s: float, weight_s: float, batched: Any, extra_params: int) -> None:
        super().__init__()
        self.linear = nn.Linear(LINEAR_WIDTH, LINEAR_WIDTH, bias=False)
        nn.init.zeros_(self.linear.weight)  # zero activations all along: no under- or overflow over 64 layers
        self.linear.emulated_batched_weight_s = batched  # type: ignore[assignment]  # read by the patched flush
        self.extra = nn.Parameter(torch.zeros(extra_params)) if extra_params else None
        self.forward_s, self.backward_s, self.weight_s = forward_s, backward_s, weight_s

    def forward(self, x: Tensor) -> Tensor:
        return _Sleep.apply(self.linear(x), self)  # the zero weight's output; ``extra`` is only reduced


class EmulatedLink(NcclOrderLink):
    """:class:`~lightning_bfpp.run.nccl_order_link.NcclOrderLink` (NCCL's ordering, one stream per rank) whose
    transfers last the stated network's time."""

    def transfer_seconds(self, tensor: Tensor, src: int) -> float:
        return NETWORK[0].transfer_seconds(tensor, src, dist.get_rank())


class _DelayedWork:
    """A real reduction that completes no earlier than ``end`` (its emulated end on the communication stream)."""

    def __init__(self, work: dist.Work, end: float) -> None:
        self.work, self.end = work, end

    def is_completed(self) -> bool:
        return time.perf_counter() >= self.end and self.work.is_completed()

    def exception(self) -> Any:
        return self.work.exception()

    def wait(self, *args: Any) -> bool:
        self.work.wait(*args)
        remaining = self.end - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        return True


def install(network: Network) -> None:
    """In a rank process: the network of :class:`EmulatedLink`, delayed asynchronous reductions over the
    data-parallel replicas, and batched weight-gradient products that sleep their emulated time."""
    NETWORK[:] = [network]
    all_reduce = dist.all_reduce
    stream_free = [0.0]  # when the rank's communication stream is free

    def delayed_all_reduce(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
        work = all_reduce(tensor, *args, **kwargs)
        group = kwargs.get("group")
        if not kwargs.get("async_op") or group is None or dist.get_world_size(group) != network.dp_size:
            return work
        start = max(time.perf_counter(), stream_free[0])
        stream_free[0] = end = start + network.all_reduce_seconds(tensor.numel())
        return _DelayedWork(work, end)

    dist.all_reduce = delayed_all_reduce  # type: ignore[assignment]
    flush = _DeferredWeightGrad.flush

    def emulated_flush(self: _DeferredWeightGrad) -> None:
        batched = getattr(self.linear, "emulated_batched_weight_s", None)
        if batched is not None and self.inputs:
            sleep_for(batched(len(self.inputs)))
        flush(self)

    _DeferredWeightGrad.flush = emulated_flush  # type: ignore[method-assign]
