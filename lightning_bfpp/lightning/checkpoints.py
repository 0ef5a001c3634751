"""The checkpoint side of :class:`~lightning_bfpp.lightning.strategy.BFPPStrategy`.

A checkpoint is a directory: a torch.distributed.checkpoint (DCP) checkpoint in which each rank writes the stages it
holds under the parameter names of the unsplit module, plus ``meta.pt`` (rank 0) with the rest of Lightning's
checkpoint. The file format is :mod:`lightning_bfpp.run.checkpoint`; see ``docs/guide/checkpoints.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.optim import Optimizer
from typing_extensions import override

from lightning_bfpp.lightning.internals import unwrap_optimizer
from lightning_bfpp.run import checkpoint as bfpp_checkpoint
from lightning_bfpp.run.zero import adopt_local_options


class ShardedCheckpoints:
    """Strategy methods that save and load sharded checkpoints; mixed into ``BFPPStrategy`` (it uses the strategy's
    ``lightning_module``, ``optimizers``, ``broadcast``, ``barrier``, ``is_global_zero`` and ``_explain_lost_rank``)."""

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # each rank loads into its own stages, which exist only after setup()

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return False  # load_checkpoint() loads the optimizer states by parameter name

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """This rank's stages (and any state outside the layers), under the names of the unsplit module."""
        return bfpp_checkpoint.model_state_dict(self.lightning_module)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimizer state of this rank's parameters, flattened and keyed by parameter name."""
        return bfpp_checkpoint.optimizer_state_dict(self.lightning_module, unwrap_optimizer(optimizer))

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Writes the sharded checkpoint directory ``filepath`` (every rank takes part); an existing file or directory
        there is replaced. The write goes to a hidden sibling directory that is renamed to ``filepath`` only after
        every rank has finished, so a process killed while saving leaves the previous checkpoint intact."""
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint(..., storage_options=...) is not supported: the checkpoint is "
                "written with torch.distributed.checkpoint, not with a CheckpointIO plugin."
            )
        path = Path(self.broadcast(str(filepath)))
        with self._explain_lost_rank(f"the save of the checkpoint {path}"):
            bfpp_checkpoint.save_sharded_atomic(checkpoint, path, self.is_global_zero, self.barrier)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Loads this rank's stages and optimizer states from a sharded checkpoint directory (any layout) or from a
        plain one-file Lightning checkpoint of the unsplit module; returns the rest of the checkpoint."""
        path = Path(self.broadcast(str(checkpoint_path)))
        module = self.lightning_module
        strict = module.strict_loading
        optimizers = [unwrap_optimizer(o) for o in self.optimizers]  # the runtime takes plain torch optimizers
        if bfpp_checkpoint.is_sharded_checkpoint(path):
            checkpoint = bfpp_checkpoint.load_sharded(path, module, optimizers, strict, weights_only)
        elif path.is_file():
            checkpoint = bfpp_checkpoint.load_plain(path, module, optimizers, None, strict, weights_only)
        else:
            checkpoint = None
        if checkpoint is not None:
            for optimizer in optimizers:
                adopt_local_options(optimizer)  # ZeRO-1: the options restored into the local optimizer
            return checkpoint
        if bfpp_checkpoint.is_incomplete_checkpoint(path):
            raise FileNotFoundError(
                f"{path} is an incomplete checkpoint (it has no {bfpp_checkpoint.META_FILENAME}, which is written "
                "last): its save did not finish. Resume from an earlier checkpoint."
            )
        raise FileNotFoundError(
            f"{path} is neither a bfpp checkpoint directory (with {bfpp_checkpoint.META_FILENAME}) nor a Lightning "
            "checkpoint file."
        )

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # load_checkpoint() has loaded this rank's stages

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass  # load_checkpoint() has loaded the optimizer states

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        """Removes a checkpoint directory (or file, or link) on rank 0, once every rank is done with it."""
        bfpp_checkpoint.clear_path(Path(filepath), self.is_global_zero, self.barrier)
