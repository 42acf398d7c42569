"""``glyphs-grating``: the glyph stream where the shipped backbone is weak.

The same class-incremental glyph tasks, each image re-drawn as its ink (a soft mask of the rendered
glyph) plus a full-image sinusoidal grating of amplitude ``amplitude`` at the ViT's patch period
(random angle and phase per image) plus Gaussian noise. The backbone was pre-trained on clean glyphs:
its frozen features see mostly the grating (a nearest class mean on the first three tasks: 10.8 %
against 75.8 % on clean glyphs), while an adapter trained on the same images recovers the glyph
(36.5 % jointly on those tasks) — a stream on which adaptation has something to add.
"""

from __future__ import annotations

import math

import torch

from .glyphs import make_glyph_stream
from .images import ImageSet, TaskData

__all__ = ["grating", "make_grating_stream"]


def grating(
    images: torch.Tensor, seed: int, amplitude: float = 0.3, period: float = 4.0, noise: float = 0.1
) -> torch.Tensor:
    """uint8 (N, 3, H, W) glyph renders → their ink plus a grating and noise, grey uint8."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = images.shape
    grey = images.float().mean(1) / 255.0
    median = grey.flatten(1).median(1).values.view(-1, 1, 1)
    deviation = (grey - median).abs()
    ink = (2 * deviation / deviation.flatten(1).amax(1).clamp_min(1e-3).view(-1, 1, 1)).clamp(0, 1)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    theta = (torch.rand(n, generator=g) * math.pi).view(-1, 1, 1)
    phase = (torch.rand(n, generator=g) * 2 * math.pi).view(-1, 1, 1)
    wave = torch.sin(2 * math.pi / period * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
    out = ink + amplitude * wave + noise * torch.randn(n, h, w, generator=g)
    out = ((out + amplitude + 2 * noise) / (1 + 2 * amplitude + 4 * noise)).clamp(0, 1)
    return (out * 255).round().to(torch.uint8).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def make_grating_stream(
    num_tasks: int = 10,
    train_per_class: int = 40,
    test_per_class: int = 20,
    seed: int = 0,
    image_size: int = 32,
    amplitude: float = 0.3,
) -> list[TaskData]:
    tasks = []
    for t, task in enumerate(make_glyph_stream("class", num_tasks, train_per_class, test_per_class, seed, image_size)):
        train, test = task.train, task.test
        assert isinstance(train, ImageSet) and isinstance(test, ImageSet)
        tasks.append(
            TaskData(
                task.name,
                "class",
                ImageSet(grating(train.images, seed * 1000 + 2 * t, amplitude), train.labels, train.classes),
                ImageSet(grating(test.images, seed * 1000 + 2 * t + 1, amplitude), test.labels, test.classes),
            )
        )
    return tasks
