"""Reading checkpoint files without running code from them, with errors that name the file and the cause.

A checkpoint may hold tensors, numbers, strings, ``None`` and containers of them (what ``torch.load(...,
weights_only=True)`` accepts), and DCP's ``.metadata`` only DCP's own metadata types. Every file of a checkpoint is
read here under those rules, so a planted payload (a pickle whose ``__reduce__`` calls a function) is refused with a
:class:`CheckpointError` naming the file before anything of it runs:

- ``.metadata``: :func:`read_dcp_metadata`, a restricted unpickler (torch's ``FileSystemReader`` uses plain
  ``pickle.load``);
- the ``.distcp`` shards: tensors are read by DCP with ``weights_only=True``; non-tensor values (optimizer options)
  by :class:`SafeBytesLoading` with ``weights_only=True`` too (DCP's planner uses ``weights_only=False``);
- ``meta.pt`` and one-file checkpoints: :func:`load_file`.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

METADATA_FILENAME = ".metadata"  # DCP's


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read or written; the message (one line) names the file and the cause."""


# What a `.metadata` written by torch.distributed.checkpoint refers to (checked against torch 2.13's DCP, with model
# and flattened optimizer states, DTensor shards and float16/float32/float64/int64/bool tensors), besides the dtypes.
_METADATA_TYPES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by its name
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},  # checkpoint_id
}


class _Refused(pickle.UnpicklingError):
    """The stream names a class or function outside the allowed ones."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: any other class or function the stream names is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_TYPES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(vars(torch).get(name), (torch.dtype, torch.layout)):
            return vars(torch)[name]
        raise _Refused(f"it refers to {module}.{name}, which is not one of DCP's metadata types")


def read_dcp_metadata(directory: str | Path) -> Metadata:
    """The DCP metadata of the checkpoint ``directory``, read without running code from the file; a
    :class:`CheckpointError` naming the file if it is missing, unreadable, truncated or holds anything else."""
    file = Path(directory) / METADATA_FILENAME
    try:
        with open(file, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
    except _Refused as error:
        raise CheckpointError(f"Refused to load {file}: {error}; a save never writes this") from None
    except Exception as error:
        raise read_error(file, error) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"Refused to load {file}: it holds a {type(metadata).__name__}, not DCP metadata")
    for info in metadata.storage_data.values():
        relative = getattr(info, "relative_path", None)
        if not isinstance(relative, str) or PurePath(relative).name != relative or relative in ("", ".", ".."):
            raise CheckpointError(f"Refused to load {file}: it names the data file {relative!r} outside {directory}")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with :func:`read_dcp_metadata` in place of its plain ``pickle.load`` of ``.metadata``."""

    def __init__(self, path: str | Path, metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self.directory = Path(path)
        self._safe_metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # DCP's fallback to per-rank metadata, which a save here never writes
            raise CheckpointError(f"{self.directory / METADATA_FILENAME} could not be read")
        if self._safe_metadata is None:
            self._safe_metadata = read_dcp_metadata(self.directory)
        metadata = self._safe_metadata
        if metadata.storage_meta is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _slice_file(self, file: Any, sinfo: Any) -> Any:
        self.reading = self.directory / sinfo.relative_path  # the file a failure of read_data() was reading
        return super()._slice_file(file, sinfo)

    def read_data(self, plan: Any, planner: Any) -> Any:
        self.reading = self.directory
        try:
            return super().read_data(plan, planner)
        except CheckpointError:
            raise
        except Exception as error:
            raise read_error(self.reading, error) from None


@contextmanager
def one_line_errors(directory: Path, doing: str = "read") -> Iterator[None]:
    """Turns DCP's ``CheckpointException`` (every rank's traceback in one message) into the :class:`CheckpointError`
    of the first rank that failed, or one naming ``directory`` and the cause."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exception:
        failures = sorted(exception.failures.items())
        error = failures[0][1][0] if failures else exception
        if isinstance(error, CheckpointError):
            raise CheckpointError(str(error)) from None
        raise CheckpointError(f"Cannot {doing} the checkpoint {directory}: {_describe(error)}") from None


class SafeBytesLoading:
    """A DCP load planner mix-in that reads non-tensor values with ``weights_only=True`` (DCP's default planner
    unpickles them with ``weights_only=False``). Set ``directory`` (the checkpoint) for the error messages."""

    directory: Path | None = None

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        fqn = read_item.dest_index.fqn
        info = self.metadata.storage_data.get(read_item.storage_index)  # type: ignore[attr-defined]
        file = Path(self.directory or ".") / getattr(info, "relative_path", "?")
        obj = load_file(value, name=f"{file} (the value of {fqn})")
        if self.flatten_state_dict:  # type: ignore[attr-defined]
            set_element(self.original_state_dict, self.mappings[fqn], obj)  # type: ignore[attr-defined]
        else:
            self.state_dict[fqn] = obj  # type: ignore[attr-defined]


class SafeLoadPlanner(SafeBytesLoading, DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor values with ``weights_only=True``."""

    def __init__(self, directory: Path, allow_partial_load: bool = False) -> None:
        super().__init__(allow_partial_load=allow_partial_load)
        self.directory = directory


def load_file(
    source: str | Path | io.BytesIO, weights_only: bool | None = True, name: str | None = None, mmap: bool = False
) -> Any:
    """``torch.load(source)`` on the CPU with ``weights_only`` (``None``: True), its failures as one-line
    :class:`CheckpointError` naming the file (``name``, default: the path) and the cause. ``weights_only=False``
    runs whatever the file says: pass it only for a file you trust."""
    name = name or str(source)
    weights_only = True if weights_only is None else weights_only
    try:
        return torch.load(source, map_location="cpu", weights_only=weights_only, mmap=mmap or None)
    except Exception as error:
        raise read_error(name, error) from None


def read_error(file: str | Path, error: BaseException) -> CheckpointError:
    """The one-line error for ``error``, raised while reading ``file``."""
    if isinstance(error, CheckpointError):
        return error
    if isinstance(error, FileNotFoundError):
        return CheckpointError(f"{error.filename or file} is missing")
    if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error):
        return CheckpointError(
            f"Refused to load {file}: {_weights_only_reason(error)}. A checkpoint may hold tensors, numbers, strings "
            "and containers of them; loading anything else could run code from the file"
        )
    if isinstance(error, OSError):
        return CheckpointError(f"Cannot read {file}: {error.strerror or error}")
    # a truncated zip archive or pickle, an empty file: whatever torch.load or pickle raises
    return CheckpointError(f"Cannot read {file}: it is truncated or corrupted ({_describe(error)})")


def check_data_files(directory: Path, metadata: Metadata) -> None:
    """Raises a :class:`CheckpointError` naming the first data file that ``metadata`` lists and that is missing or
    shorter than the data it should hold (a truncated copy, a save that did not finish)."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = directory / name
        try:
            actual = file.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{file} is missing: the checkpoint's {METADATA_FILENAME} lists it") from None
        except OSError as error:
            raise read_error(file, error) from None
        if actual < size:
            raise CheckpointError(
                f"{file} is truncated: it has {actual} bytes, the checkpoint's {METADATA_FILENAME} expects {size}"
            )


def save_error(error: BaseException, target: Path, rank: int) -> str:
    """One line for a failed save of the checkpoint ``target`` on global rank ``rank``: the operating system's cause
    (``No space left on device``) when there is one, however deep torch or DCP wrapped it."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(error, CheckpointException) and error.failures:
        rank, (error, _) = sorted(error.failures.items())[0]
    cause: BaseException | None = error
    while cause is not None and not (isinstance(cause, OSError) and cause.errno is not None):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        where = f" ({cause.filename})" if cause.filename else ""
        reason = f"{cause.strerror}{where}"
    else:
        reason = _describe(error)
    return f"Cannot save the checkpoint {target}: global rank {rank} failed to write its files: {reason}"


def _weights_only_reason(error: BaseException) -> str:
    """The line of torch's ``weights_only`` error that says what the file holds."""
    for line in str(error).splitlines():
        line = line.strip().rpartition("WeightsUnpickler error:")[2].strip()
        if line and not line.startswith(("Weights only load failed", "Check the documentation", "Please file")):
            return line.rstrip(".")
    return _describe(error)


def _describe(error: BaseException) -> str:
    """``error`` in one short line: its type and the first sentence of its message."""
    text = " ".join(str(error).split())
    text = text.split(". ")[0][:300]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
