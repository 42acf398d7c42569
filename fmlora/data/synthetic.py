"""A small synthetic task stream for tests and smoke runs: no files, no downloads, seeded.

Each class is a smooth random colour pattern; samples add a random shift, contrast jitter and
pixel noise, so classes overlap enough that a classifier must learn, not look up.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .images import ImageSet, TaskData

__all__ = ["make_synthetic_stream"]


def _prototypes(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def _samples(prototype: torch.Tensor, count: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    size = prototype.shape[-1]
    shifts = torch.randint(-size // 8, size // 8 + 1, (count, 2), generator=generator)
    out = []
    for dy, dx in shifts.tolist():
        out.append(torch.roll(prototype, shifts=(dy, dx), dims=(-2, -1)))
    images = torch.stack(out)
    contrast = 0.7 + 0.6 * torch.rand(count, 1, 1, 1, generator=generator)
    images = (images - 0.5) * contrast + 0.5
    images = images + noise * torch.randn(images.shape, generator=generator)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def make_synthetic_stream(
    num_tasks: int = 3,
    classes_per_task: int = 4,
    train_per_class: int = 24,
    test_per_class: int = 12,
    image_size: int = 32,
    noise: float = 0.25,
    seed: int = 0,
) -> list[TaskData]:
    """A class-incremental stream: task t brings classes ``t<t>c<i>``."""
    generator = torch.Generator().manual_seed(seed)
    protos = _prototypes(num_tasks * classes_per_task, image_size, generator)
    tasks = []
    for t in range(num_tasks):
        classes = tuple(f"t{t}c{i}" for i in range(classes_per_task))
        splits = {}
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            images, labels = [], []
            for i in range(classes_per_task):
                images.append(_samples(protos[t * classes_per_task + i], per_class, noise, generator))
                labels.append(torch.full((per_class,), i, dtype=torch.long))
            splits[split] = ImageSet(torch.cat(images), torch.cat(labels), classes)
        tasks.append(TaskData(name=f"task{t}", kind="class", train=splits["train"], test=splits["test"]))
    return tasks
