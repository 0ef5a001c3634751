"""``ckpt_path``: a checkpoint to resume from, or ``last``, the newest complete checkpoint of earlier runs; and the
command line that resumes this run.

A checkpoint is complete when it can be loaded: a sharded checkpoint directory whose ``meta.pt`` (written last)
exists, or a one-file checkpoint whose zip archive ends with its central directory (``torch.save`` writes it last).
While a sharded checkpoint replaces an older one of the same name (``last.ckpt``), the older one is moved to
``.last.ckpt.old`` for the moment between two renames; ``last`` finds it (or the new one, still named
``.last.ckpt.partial``) there, so some complete checkpoint exists at every moment of a save.
"""

from __future__ import annotations

import logging
import os
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path

from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from lightning_bfpp.hydra.checks import ConfigError
from lightning_bfpp.run.checkpoint import META_FILENAME, OLD_SUFFIX, PARTIAL_SUFFIX, is_sharded_checkpoint

log = logging.getLogger(__name__)


def checkpoint_time(path: Path) -> float | None:
    """When the checkpoint at ``path`` was completed (its last file's modification time), or ``None`` if it is not
    a complete checkpoint."""
    try:
        if is_sharded_checkpoint(path):
            return (path / META_FILENAME).stat().st_mtime
        if path.is_file() and zipfile.is_zipfile(path):
            return path.stat().st_mtime
    except OSError:  # removed while we looked (another job's save replacing it)
        return None
    return None


def checkpoints_in(directory: Path) -> Iterable[Path]:
    """The checkpoints of ``directory``: ``*.ckpt``, and a save's hidden ``.<name>.old`` / ``.<name>.partial``."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("*.ckpt") if not p.name.startswith(".")]
    for suffix in (OLD_SUFFIX, PARTIAL_SUFFIX):
        found += directory.glob(f".*.ckpt{suffix}")
    return found


def newest_checkpoint(directories: Iterable[Path]) -> Path | None:
    """The complete checkpoint completed last among those of ``directories`` (``None`` if there is none)."""
    timed = [(time, path) for d in directories for path in checkpoints_in(d) if (time := checkpoint_time(path))]
    return max(timed)[1] if timed else None


def resolve_ckpt_path(value: str | None, run_dir: Path, checkpoint_dir: Path, sweep: bool = False) -> str | None:
    """``None``, a checkpoint path, or ``"last"``: the newest complete checkpoint among the runs next to this one
    (``<run dir>/../*/checkpoints/``) and in ``checkpoint_dir``, whatever their names (``save_last`` or not); in a
    sweep (``-m``), this job's own checkpoints only (e.g. of a resubmitted SLURM job)."""
    if value is None:
        return None
    if value == "last":
        directories = [checkpoint_dir] if sweep else [*run_dir.parent.glob("*/checkpoints"), checkpoint_dir]
        found = newest_checkpoint(dict.fromkeys(d.resolve() for d in directories))
        if found is None:
            where = checkpoint_dir if sweep else f"{run_dir.parent}/*/checkpoints/"
            log.warning(f"ckpt_path=last: no complete checkpoint in {where}: training from scratch.")
            return None
        return str(found)
    path = Path(to_absolute_path(value))
    if not path.exists():
        raise ConfigError(f"ckpt_path={value!r}: {path} does not exist (give a checkpoint, or ckpt_path=last).")
    return str(path)


def resume_command(hydra_cfg: DictConfig, ckpt: str, max_steps: int) -> str:
    """The command line of this run with ``ckpt_path`` and ``trainer.max_steps`` replaced."""
    script = os.path.relpath(to_absolute_path(sys.argv[0]))
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith(("ckpt_path=", "trainer.max_steps="))]
    return " ".join(["python", script, *overrides, f"ckpt_path={ckpt}", f"trainer.max_steps={max_steps}"])
