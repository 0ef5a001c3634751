"""Language-model data that needs no download: bytes of text files, or token ids from a ``.npy``/``.bin`` file.

The default corpus is the source of the Python standard library (every ``.py`` file under
``sysconfig.get_paths()["stdlib"]``, outside ``site-packages``), present wherever Python is, read in a fixed file
order. The token stream is split once: the last ``val_fraction`` is held out for validation. Training samples are
random windows of ``seq_len + 1`` tokens (inputs and next-token labels), drawn per batch from a seeded generator,
so that every rank of a pipeline reads the same batch and a resumed run reads what an uninterrupted run would have;
validation windows are consecutive and do not overlap.
"""

from __future__ import annotations

import logging
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

log = logging.getLogger(__name__)

TOKEN_SUFFIXES = (".npy", ".bin")


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted by path (third-party ``site-packages`` excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        f
        for f in root.rglob("*.py")
        if not {"site-packages", "dist-packages", "__pycache__"} & set(f.relative_to(root).parts)
    ]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _is_text(path: Path) -> bool:
    with path.open("rb") as f:
        return b"\0" not in f.read(8192)


def text_files(path: Path, glob: str | None) -> list[Path]:
    """The files under directory ``path`` matching ``glob`` (default: every non-hidden file that is not binary)."""
    files = sorted(f for f in path.glob(glob or "**/*") if f.is_file())
    files = [f for f in files if not any(part.startswith(".") for part in f.relative_to(path).parts)]
    return files if glob else [f for f in files if _is_text(f)]


def read_bytes(files: list[Path], max_tokens: int | None) -> tuple[np.ndarray, int]:
    """The bytes of ``files`` in order, at most ``max_tokens`` of them, and the number of files read."""
    chunks, total = [], 0
    for f in files:
        data = f.read_bytes()
        chunks.append(data)
        total += len(data)
        if max_tokens is not None and total >= max_tokens:
            break
    array = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    return (array[:max_tokens] if max_tokens is not None else array), len(chunks)


def load_tokens(
    path: str | None, glob: str | None = None, dtype: str = "uint16", max_tokens: int | None = None
) -> tuple[np.ndarray, int | None, str]:
    """The token stream named by ``path``, the vocabulary size it implies (256 for bytes, None for token ids) and a
    description. ``path`` is None (the standard library), a directory or text file (bytes), or ``.npy``/``.bin``."""
    if path is None:
        tokens, count = read_bytes(stdlib_files(), max_tokens)
        return tokens, 256, f"{count} .py files of the Python standard library ({len(tokens):,} bytes)"
    source = Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(
            f"data.path={path!r} does not exist: give a text file, a directory or a .npy/.bin file."
        )
    if source.is_dir():
        files = text_files(source, glob)
        if not files:
            raise ValueError(f"data.path={path!r} holds no text files (data.glob={glob!r}).")
        tokens, count = read_bytes(files, max_tokens)
        return tokens, 256, f"{count} files under {source} ({len(tokens):,} bytes)"
    if source.suffix == ".npy":
        tokens = np.load(source, mmap_mode="r")
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(
                f"data.path={path!r} must hold a 1-D array of integer token ids, got {tokens.dtype}{tokens.shape}."
            )
    elif source.suffix == ".bin":
        try:
            tokens = np.memmap(source, dtype=np.dtype(dtype), mode="r")
        except TypeError as error:
            raise ValueError(f"data.dtype={dtype!r} is not a numpy dtype (e.g. uint16, int32).") from error
    else:
        tokens, _ = read_bytes([source], max_tokens)
        return tokens, 256, f"{source} ({len(tokens):,} bytes)"
    tokens = tokens[:max_tokens] if max_tokens is not None else tokens
    return tokens, None, f"{source} ({len(tokens):,} token ids)"


class RandomWindows(IterableDataset):
    """An endless stream of batches of windows of ``seq_len + 1`` tokens at random offsets.

    Batch ``k`` of the whole job (all data-parallel replicas together) is drawn from a generator seeded with
    ``(seed, k)``; replica ``rank`` of ``replicas`` takes its share. So every rank of a pipeline reads the same batch,
    and a run resumed at step ``s`` (``start``) reads exactly the batches an uninterrupted run would have read.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.start, self.replicas, self.rank = start, replicas, rank

    def batch(self, k: int) -> dict[str, Tensor]:
        rng = np.random.default_rng((self.seed, k))
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size * self.replicas)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        windows = [_window(self.tokens, int(s), self.seq_len) for s in mine]
        return {key: torch.stack([w[key] for w in windows]) for key in windows[0]}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        worker = get_worker_info()
        workers, index = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        k = self.start + index  # workers take turns: the DataLoader returns their batches in order
        while True:
            yield self.batch(k)
            k += workers


class ConsecutiveWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens, in order."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return _window(self.tokens, i * self.seq_len, self.seq_len)


def _window(tokens: np.ndarray, start: int, seq_len: int) -> dict[str, Tensor]:
    chunk = torch.from_numpy(np.asarray(tokens[start : start + seq_len + 1]).astype(np.int64))
    return {"input_ids": chunk[:-1], "labels": chunk[1:]}


class TextDataModule(pl.LightningDataModule):
    """Next-token prediction over a token stream (see :func:`load_tokens` for ``path``).

    The data is read when the module is created, so that :attr:`vocab_size` is known before the model is built.
    ``batch_size`` is per data-parallel replica; under ``strategy=bfpp`` it must be a multiple of the micro-batches.
    """

    def __init__(
        self,
        path: str | None = None,
        glob: str | None = None,
        seq_len: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        max_tokens: int | None = None,
        dtype: str = "uint16",
        vocab_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction={val_fraction} must lie between 0 and 1.")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"data.{name}={value}: give a number >= 1.")
        self.seq_len, self.batch_size, self.num_workers, self.seed = seq_len, batch_size, num_workers, seed
        tokens, implied_vocab, self.description = load_tokens(path, glob, dtype, max_tokens)
        n_val = max(seq_len + 1, int(len(tokens) * val_fraction))
        if len(tokens) - n_val < seq_len + 1:
            raise ValueError(
                f"The data has {len(tokens)} tokens: too few for data.seq_len={seq_len} with "
                f"data.val_fraction={val_fraction}; use more text or a smaller seq_len."
            )
        self.train_tokens, self.val_tokens = tokens[:-n_val], tokens[-n_val:]
        self.vocab_size = vocab_size or implied_vocab or int(np.max(tokens)) + 1
        log.debug("Data: %s, %d training and %d validation tokens", self.description, len(tokens) - n_val, n_val)

    def train_dataloader(self) -> DataLoader:
        # Batches are numbered over the whole run, so a resumed run continues where the checkpoint left off; the
        # data-parallel replicas split each batch (Lightning injects no sampler into an iterable dataset).
        trainer = self.trainer
        shard = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {"num_replicas": 1, "rank": 0}
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
        dataset = RandomWindows(
            self.train_tokens, self.seq_len, self.batch_size, self.seed, start, shard["num_replicas"], shard["rank"]
        )
        return self._loader(dataset, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._loader(ConsecutiveWindows(self.val_tokens, self.seq_len), batch_size=self.batch_size)

    def _loader(self, dataset: Dataset, batch_size: int | None) -> DataLoader:
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=on_gpu,
            persistent_workers=self.num_workers > 0,
        )
