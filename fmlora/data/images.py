"""Labelled image sources and tasks: what a learner trains on and evaluates with.

Every source yields uint8 (N, 3, H, W) batches through ``fetch``; the model's Preprocessor (timm's
data config) normalises them. Small sets live in memory (``ImageSet``); dataset folders stay on disk
(``FileImageSet``) and are decoded batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image, ImageOps

from fmlora.errors import DataError

__all__ = [
    "ConcatImages",
    "FileImageSet",
    "ImageSet",
    "ImageSource",
    "SubsetImages",
    "TaskData",
    "batches",
    "concat_sources",
    "first_per_class",
]


@runtime_checkable
class ImageSource(Protocol):
    """Labelled images: ``labels`` index into ``classes``; ``fetch`` returns uint8 (N, 3, H, W)."""

    @property
    def classes(self) -> tuple[str, ...]: ...

    @property
    def labels(self) -> torch.Tensor: ...

    def __len__(self) -> int: ...

    def fetch(self, index: torch.Tensor) -> torch.Tensor: ...


def _check_labels(labels: torch.Tensor, count: int, classes: tuple[str, ...]) -> None:
    if labels.dtype != torch.long or labels.ndim != 1 or labels.shape[0] != count:
        raise DataError("labels must be a 1-d int64 tensor with one entry per image")
    if count == 0:
        raise DataError("an image set needs at least one image")
    if len(set(classes)) != len(classes):
        raise DataError("class names must be unique")
    if int(labels.min()) < 0 or int(labels.max()) >= len(classes):
        raise DataError("labels must index into classes")


@dataclass(frozen=True)
class ImageSet:
    """In-memory uint8 images (N, 3, H, W) with labels as indices into ``classes``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise DataError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        _check_labels(self.labels, int(self.images.shape[0]), self.classes)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def fetch(self, index: torch.Tensor) -> torch.Tensor:
        return self.images[index]

    @staticmethod
    def concat(sets: Sequence[ImageSet]) -> ImageSet:
        """Join in-memory sets with different class lists into one set over the union of classes."""
        joined = ConcatImages(tuple(sets))
        return ImageSet(torch.cat([s.images for s in sets]), joined.labels, joined.classes)


def resize_center_crop(image: np.ndarray | Image.Image, size: tuple[int, int], crop_pct: float = 1.0) -> np.ndarray:
    """Resize the shorter side to ``max(size) / crop_pct`` (bicubic) and centre-crop to ``size``.

    timm's eval recipe, and the one place it is written: training (FileImageSet, the worker) and
    serving (server.core.images) both call it, so a served image reaches the model exactly as a training
    image with the same pixels did. Returns uint8 (H, W, 3).
    """
    if not 0 < crop_pct <= 1:
        raise DataError("crop_pct must be in (0, 1]")
    height, width = int(size[0]), int(size[1])
    if isinstance(image, np.ndarray):
        if image.shape[0] == height and image.shape[1] == width and crop_pct == 1.0:
            return np.ascontiguousarray(image)
        image = Image.fromarray(np.ascontiguousarray(image))
    elif image.mode != "RGB":
        image = image.convert("RGB")
    scale = max(height, width) / crop_pct / min(image.size)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
        Image.Resampling.BICUBIC,
    )
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    return np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.uint8)


def _load_rgb(path: Path, size: tuple[int, int], crop_pct: float) -> np.ndarray:
    """Decode (honouring EXIF orientation, as serving does) and resize/crop to ``size``."""
    try:
        with Image.open(path) as img:
            upright = ImageOps.exif_transpose(img) or img
            return resize_center_crop(upright.convert("RGB"), size, crop_pct)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from exc


@dataclass(frozen=True)
class FileImageSet:
    """Images on disk, decoded on demand at ``image_size`` (H, W)."""

    paths: tuple[Path, ...]
    labels: torch.Tensor
    classes: tuple[str, ...]
    image_size: tuple[int, int] = (224, 224)
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        _check_labels(self.labels, len(self.paths), self.classes)
        if not 0 < self.crop_pct <= 1:
            raise DataError("crop_pct must be in (0, 1]")

    def __len__(self) -> int:
        return len(self.paths)

    def fetch(self, index: torch.Tensor) -> torch.Tensor:
        arrays = [_load_rgb(self.paths[i], self.image_size, self.crop_pct) for i in index.tolist()]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def resized(self, image_size: tuple[int, int], crop_pct: float | None = None) -> FileImageSet:
        crop = self.crop_pct if crop_pct is None else crop_pct
        return FileImageSet(self.paths, self.labels, self.classes, tuple(image_size), crop)


@dataclass(frozen=True)
class ConcatImages:
    """Several sources as one, over the union of their classes (joint training, merged splits)."""

    sources: tuple[ImageSource, ...]
    classes: tuple[str, ...] = field(init=False)
    labels: torch.Tensor = field(init=False)
    _offsets: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.sources:
            raise DataError("nothing to concatenate")
        classes: list[str] = []
        for s in self.sources:
            classes.extend(c for c in s.classes if c not in classes)
        position = {c: i for i, c in enumerate(classes)}
        labels = [torch.tensor([position[c] for c in s.classes], dtype=torch.long)[s.labels] for s in self.sources]
        offsets = [0]
        for s in self.sources:
            offsets.append(offsets[-1] + len(s))
        object.__setattr__(self, "classes", tuple(classes))
        object.__setattr__(self, "labels", torch.cat(labels))
        object.__setattr__(self, "_offsets", tuple(offsets))

    def __len__(self) -> int:
        return self._offsets[-1]

    def fetch(self, index: torch.Tensor) -> torch.Tensor:
        offsets = torch.tensor(self._offsets)
        which = torch.bucketize(index, offsets[1:], right=True)
        out: torch.Tensor | None = None
        for k in which.unique().tolist():
            mask = which == k
            part = self.sources[k].fetch(index[mask] - self._offsets[k])
            if out is None:
                out = torch.empty((len(index), *part.shape[1:]), dtype=part.dtype)
            out[mask] = part
        assert out is not None
        return out


def concat_sources(sources: Sequence[ImageSource]) -> ImageSource:
    return sources[0] if len(sources) == 1 else ConcatImages(tuple(sources))


@dataclass(frozen=True)
class SubsetImages:
    """The images of ``source`` at ``index``, in that order."""

    source: ImageSource
    index: torch.Tensor

    @property
    def classes(self) -> tuple[str, ...]:
        return self.source.classes

    @property
    def labels(self) -> torch.Tensor:
        return self.source.labels[self.index]

    def __len__(self) -> int:
        return len(self.index)

    def fetch(self, index: torch.Tensor) -> torch.Tensor:
        return self.source.fetch(self.index[index])


def _first_per_class_mask(labels: torch.Tensor, count: int) -> torch.Tensor:
    if count < 1:
        raise DataError(f"keep at least one image per class, not {count}")
    keep = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        keep[(labels == c).nonzero().flatten()[:count]] = True
    return keep


def _subset(source: ImageSource, index: torch.Tensor) -> ImageSource:
    if isinstance(source, ImageSet):
        return ImageSet(source.images[index], source.labels[index], source.classes)
    return SubsetImages(source, index)


def first_per_class(source: ImageSource, count: int) -> ImageSource:
    """The first ``count`` images of every class of ``source`` (all of a class that has fewer), in
    their original order: e.g. what a worker trains on once intake has held out the gate's share."""
    return _subset(source, _first_per_class_mask(source.labels, count).nonzero().flatten())


def after_first_per_class(source: ImageSource, count: int) -> ImageSource:
    """Every image of ``source`` that ``first_per_class(source, count)`` leaves out, in order: the
    gate's share in a benchmark that plays the worker."""
    rest = (~_first_per_class_mask(source.labels, count)).nonzero().flatten()
    if len(rest) == 0:
        raise DataError(f"no class has more than {count} images: nothing is left after the first {count}")
    return _subset(source, rest)


@dataclass(frozen=True)
class TaskData:
    """One task of a stream: a name, a kind and its train/test images."""

    name: str
    kind: Literal["class", "domain"]
    train: ImageSource
    test: ImageSource

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes


def batches(
    data: ImageSource,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    positions: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, label indices) batches; shuffled with ``generator`` for determinism.
    ``positions``: the images' positions in ``data`` instead of their labels."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        yield data.fetch(index), index if positions else data.labels[index]
