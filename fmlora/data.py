"""In-memory image tasks: what a learner trains on and evaluates with."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import DataError

__all__ = ["ImageSet", "TaskData", "batches"]


@dataclass(frozen=True)
class ImageSet:
    """uint8 images (N, 3, H, W) with labels as indices into ``classes``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise DataError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise DataError("labels must be a 1-d tensor with one entry per image")
        if self.images.shape[0] == 0:
            raise DataError("an image set needs at least one image")
        if int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes):
            raise DataError("labels must index into classes")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def label_names(self) -> list[str]:
        return [self.classes[i] for i in self.labels.tolist()]

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes)

    @staticmethod
    def concat(sets: Sequence[ImageSet]) -> ImageSet:
        """Join sets with different class lists into one set over the union of their classes."""
        classes: list[str] = []
        for s in sets:
            classes.extend(c for c in s.classes if c not in classes)
        position = {c: i for i, c in enumerate(classes)}
        labels = [torch.tensor([position[s.classes[i]] for i in s.labels.tolist()], dtype=torch.long) for s in sets]
        return ImageSet(torch.cat([s.images for s in sets]), torch.cat(labels), tuple(classes))


@dataclass(frozen=True)
class TaskData:
    """One task of a stream: a name, a kind and its train/test images."""

    name: str
    kind: Literal["class", "domain"]
    train: ImageSet
    test: ImageSet

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes


def batches(
    data: ImageSet, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, label indices) batches; shuffled with ``generator`` for determinism."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        yield data.images[index], data.labels[index]
