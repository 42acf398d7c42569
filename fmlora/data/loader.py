"""Batches for training and evaluation, with decode workers and timm's training augmentation.

On a GPU the paper benchmarks spend more time decoding JPEGs than in the forward pass, so a long run
reads through a ``torch.utils.data.DataLoader`` with worker processes and prefetching. Training-time
augmentation is timm's own recipe (``transforms_imagenet_train``: random resized crop, horizontal
flip, colour jitter) built from the model's data config; its normalisation is left out, because the
model's ``Preprocessor`` normalises every batch, augmented or not, the same way.

Augmentation draws random numbers in the loader's worker processes, which the loader seeds from the
caller's generator: a run stays reproducible and the process-global RNG (shared with a server) is
never touched. So augmentation always uses at least one worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data.transforms_factory import transforms_imagenet_train
from torch.utils.data import DataLoader, Dataset

from fmlora.errors import DataError

from .images import FileImageSet, ImageSource, batches

__all__ = ["LoaderConfig", "image_batches", "train_transform"]


@dataclass(frozen=True)
class LoaderConfig:
    """How batches are read: ``workers`` decode processes (0 = in this process), ``prefetch`` batches
    per worker, and whether training batches are augmented with timm's recipe."""

    workers: int = 0
    prefetch: int = 4
    augment: bool = False
    pin_memory: bool = False

    def __post_init__(self) -> None:
        if self.workers < 0 or self.prefetch < 1:
            raise DataError("loader workers must be >= 0 and prefetch >= 1")


def train_transform(data_config: dict[str, Any]) -> Callable[[Image.Image], Image.Image]:
    """timm's training augmentation for this data config, up to (not including) tensor conversion."""
    size = tuple(data_config["input_size"][-2:])
    primary, secondary, _final = transforms_imagenet_train(
        img_size=size, interpolation=data_config.get("interpolation", "bilinear"), separate=True
    )
    steps = [*primary.transforms, *secondary.transforms]

    def apply(image: Image.Image) -> Image.Image:
        for step in steps:
            image = step(image)
        return image

    return apply


class _Indexed(Dataset):
    """One image per item: the source's own decode, or the original file augmented by ``transform``."""

    def __init__(
        self, source: ImageSource, transform: Callable[[Image.Image], Image.Image] | None, positions: bool
    ) -> None:
        self.source = source
        self.transform = transform
        self.positions = positions

    def __len__(self) -> int:
        return len(self.source)

    def _original(self, index: int) -> Image.Image:
        if isinstance(self.source, FileImageSet):
            # Augment from the original file, not the eval-resized copy: random resized crop needs
            # the full image to crop from.
            with Image.open(self.source.paths[index]) as img:
                return (ImageOps.exif_transpose(img) or img).convert("RGB")
        pixels = self.source.fetch(torch.tensor([index]))[0]
        return Image.fromarray(pixels.permute(1, 2, 0).numpy())

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = index if self.positions else int(self.source.labels[index])
        if self.transform is None:
            return self.source.fetch(torch.tensor([index]))[0], label
        image = np.asarray(self.transform(self._original(index)), dtype=np.uint8)
        return torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous(), label


def image_batches(
    data: ImageSource,
    batch_size: int,
    *,
    loader: LoaderConfig | None = None,
    data_config: dict[str, Any] | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    positions: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) batches in the order ``batches`` gives, read by ``loader``'s workers.

    Without workers or augmentation this is exactly ``batches``. With ``loader.augment`` each image
    is decoded from its original and augmented (``data_config`` is the model's timm data config).
    ``positions``: the second tensor holds each image's position in ``data`` instead of its label
    (for per-image training targets).
    """
    cfg = loader or LoaderConfig()
    if not cfg.augment and cfg.workers == 0:
        yield from batches(data, batch_size, shuffle=shuffle, generator=generator, positions=positions)
        return
    if cfg.augment and data_config is None:
        raise DataError("augmentation needs the model's data config")
    transform = train_transform(data_config) if cfg.augment and data_config is not None else None
    order = torch.randperm(len(data), generator=generator) if shuffle else torch.arange(len(data))
    workers = max(1, cfg.workers) if cfg.augment else cfg.workers
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else 0
    reader = DataLoader(
        _Indexed(data, transform, positions),
        batch_size=batch_size,
        sampler=order.tolist(),
        num_workers=workers,
        prefetch_factor=cfg.prefetch,
        pin_memory=cfg.pin_memory,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
    yield from reader
