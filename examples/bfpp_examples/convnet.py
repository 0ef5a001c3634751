"""The second example: a residual convolutional network classifying generated images of shapes.

It shows that the strategy is not tied to transformers: the pipeline layers are a convolutional stem, residual
blocks (some of them downsampling, so activations change shape between stages) and a pooled linear head; the
activations that travel between stages are ``B x C x H x W`` feature maps. GroupNorm is used rather than BatchNorm:
batch statistics would depend on how the batch is cut into micro-batches.

The data is generated, deterministic and needs no download: each image holds one shape (disk, square, ring, cross,
diamond or bar) at a random position, size and brightness, with Gaussian noise; the label is the shape.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

from bfpp_examples.optim import adamw_warmup_cosine
from lightning_bfpp import PipelineModule

SHAPES = ("disk", "square", "ring", "cross", "diamond", "bar")


def make_shapes(num: int, size: int, noise: float, seed: int) -> tuple[Tensor, Tensor]:
    """``num`` images ``(1, size, size)`` of random shapes with noise, and their labels (indices into SHAPES)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(SHAPES), (num,), generator=g)
    r = size * (0.15 + 0.2 * torch.rand(num, 1, 1, generator=g))
    cx = r + (size - 2 * r) * torch.rand(num, 1, 1, generator=g)
    cy = r + (size - 2 * r) * torch.rand(num, 1, 1, generator=g)
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    dx, dy = (xs - cx).abs(), (ys - cy).abs()
    dist = (dx**2 + dy**2).sqrt()
    masks = torch.stack(
        [
            dist <= r,  # disk
            torch.maximum(dx, dy) <= 0.8 * r,  # square
            (dist - 0.8 * r).abs() <= 0.2 * r + 0.5,  # ring
            ((dx <= 0.25 * r) & (dy <= r)) | ((dy <= 0.25 * r) & (dx <= r)),  # cross
            dx + dy <= r,  # diamond
            (dx <= r) & (dy <= 0.3 * r),  # bar
        ]
    )
    shape = masks[labels, torch.arange(num)].float()
    brightness = 0.5 + 0.5 * torch.rand(num, 1, 1, generator=g)
    images = shape * brightness + noise * torch.randn(num, size, size, generator=g)
    return images.unsqueeze(1), labels


class ShapesDataModule(pl.LightningDataModule):
    """Generated shape images; ``batch_size`` is per data-parallel replica."""

    num_classes = len(SHAPES)

    def __init__(
        self,
        image_size: int = 24,
        train_size: int = 8192,
        val_size: int = 1024,
        noise: float = 0.35,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.train_set = TensorDataset(*make_shapes(train_size, image_size, noise, seed))
        self.val_set = TensorDataset(*make_shapes(val_size, image_size, noise, seed + 1))
        self.description = f"{train_size} training and {val_size} validation images of {len(SHAPES)} shapes"

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, drop_last=False)

    def _loader(self, dataset: TensorDataset, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            collate_fn=_as_dict,
        )


def _as_dict(samples: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    images, labels = default_collate(samples)
    return {"images": images, "labels": labels}


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and a residual connection; ``stride=2`` halves the resolution and doubles
    the channels."""

    def __init__(self, channels: int, groups: int, downsample: bool) -> None:
        super().__init__()
        out, stride = (2 * channels, 2) if downsample else (channels, 1)
        self.conv1 = nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(min(groups, out), out)
        self.conv2 = nn.Conv2d(out, out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(min(groups, out), out)
        self.shortcut = nn.Conv2d(channels, out, 1, stride=stride, bias=False) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(self.norm2(self.conv2(y)) + self.shortcut(x))


class ConvNet(PipelineModule):
    """``[stem, block_0, ..., block_{n-1}, head]`` as pipeline layers; batches ``{"images", "labels"}``.

    Arguments:
        num_classes: the number of labels.
        in_channels: the channels of the input images.
        channels: the stem's channels (doubled by each downsampling block).
        num_blocks: the number of residual blocks.
        downsample_at: the indices of the blocks that halve the resolution.
        groups: GroupNorm groups.
        optim: the optimizer settings (see :func:`~bfpp_examples.optim.adamw_warmup_cosine`).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        channels: int = 32,
        num_blocks: int = 6,
        downsample_at: tuple[int, ...] | list[int] = (2, 4),
        groups: int = 8,
        optim: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(min(groups, channels), channels),
            nn.GELU(),
        )
        blocks = []
        for i in range(num_blocks):
            blocks.append(ResidualBlock(channels, groups, downsample=i in downsample_at))
            channels *= 2 if i in downsample_at else 1
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def pipeline_layers(self) -> list[nn.Module]:
        return [self.stem, *self.blocks, self.head]

    def pipeline_input(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["images"]

    def pipeline_loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        loss = F.cross_entropy(outputs.float(), batch["labels"])
        accuracy = (outputs.argmax(-1) == batch["labels"]).float().mean()
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        self.log("train_acc", accuracy, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.log("val_acc", (logits.argmax(-1) == batch["labels"]).float().mean(), prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        return adamw_warmup_cosine(self, self.hparams.optim)
