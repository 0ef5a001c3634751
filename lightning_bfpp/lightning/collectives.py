"""The collectives of :class:`~lightning_bfpp.BFPPStrategy` that Lightning and callbacks call: over every
rank or over the data-parallel replicas, refused inside the pipeline hooks of the last stage."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import ReduceOp
from torch import Tensor
from typing_extensions import override

from lightning_bfpp.lightning.internals import distributed_is_initialized, sync_ddp_if_available
from lightning_bfpp.lightning.log_relay import refuse_in_pipeline_hook
from lightning_bfpp.run.host_sync import host_values, to_device


class PipelineCollectives:
    """Strategy collectives; mixed into ``BFPPStrategy`` (it uses the strategy's ``root_device``, ``world_size``,
    ``dp_group`` and ``_explain_lost_rank``)."""

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        # Over every rank: `reduce` sums over the data-parallel replicas only, while callers (ModelCheckpoint's top-k
        # test, file_exists) compare the sum with the world size.
        if refuse_in_pipeline_hook("trainer.strategy.reduce_boolean_decision()"):
            return decision
        flag = to_device(torch.tensor(int(decision)), self.root_device)  # type: ignore[attr-defined]
        total = host_values(sync_ddp_if_available(flag, dist.group.WORLD, reduce_op=ReduceOp.SUM))
        return total == self.world_size if all else bool(total)  # type: ignore[attr-defined]

    @override
    def barrier(self, name: str | None = None) -> None:
        if not distributed_is_initialized() or refuse_in_pipeline_hook("trainer.strategy.barrier()"):
            return
        with self._explain_lost_rank(f"a barrier{f' ({name})' if name else ''}"):  # type: ignore[attr-defined]
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.root_device.index])  # type: ignore[attr-defined]
            else:
                dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not distributed_is_initialized() or refuse_in_pipeline_hook("trainer.strategy.broadcast()"):
            return obj
        box = [obj]
        with self._explain_lost_rank("a broadcast"):  # type: ignore[attr-defined]
            dist.broadcast_object_list(box, src)
        return box[0]

    @override
    def reduce(
        self, tensor: Tensor | Any, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean"
    ) -> Tensor | Any:
        """Reduces over the data-parallel replicas by default: the ranks of one pipeline hold the same values."""
        if isinstance(tensor, Tensor) and not refuse_in_pipeline_hook("trainer.strategy.reduce()"):
            group = group if group is not None else self.dp_group  # type: ignore[attr-defined]
            return sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    @override
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        if refuse_in_pipeline_hook("self.all_gather() / trainer.strategy.all_gather()"):
            size = self.world_size if group is None else dist.get_world_size(group)  # type: ignore[attr-defined]
            return torch.stack([tensor] * size)
        return super().all_gather(tensor, group, sync_grads)  # type: ignore[misc]
