"""Extra views of preprocessed images: random resized crops done on the batch tensor.

The ridge head is solved from class statistics, and a task brings only a few dozen images per class;
more views of the same images give its Gram matrix more samples of each class's spread (RanPAC and
SLCA both fit their heads on augmented features). The crop is applied after the model's own
preprocessing, in one ``grid_sample`` per batch, so it works for any timm data config (no PIL round
trip, no flips: a mirrored glyph or text is another class), and it draws from a private generator.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from fmlora.errors import ConfigError

__all__ = ["random_resized_views"]


def random_resized_views(
    images: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.7, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """One random resized crop of each image of ``images`` (N, C, H, W), resized back to (H, W).

    ``scale``: the crop's area as a fraction of the image; ``ratio``: its aspect ratio (width /
    height). Each side is clipped to the image, so a crop never reaches past the border.
    """
    if images.ndim != 4:
        raise ConfigError(f"expected a (N, C, H, W) batch, got {tuple(images.shape)}")
    low, high = scale
    if not 0 < low <= high <= 1:
        raise ConfigError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ConfigError(f"crop ratio must satisfy 0 < low <= high, got {ratio}")
    n = images.shape[0]
    draw = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    area = low + (high - low) * draw[:, 0]
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * draw[:, 1]
    aspect = log_ratio.exp()
    # Half-sizes in grid_sample's normalised coordinates, where the whole image spans [-1, 1].
    width = (area * aspect).sqrt().clamp(max=1.0)
    height = (area / aspect).sqrt().clamp(max=1.0)
    centre_x = (2 * draw[:, 2] - 1) * (1 - width)
    centre_y = (2 * draw[:, 3] - 1) * (1 - height)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = width, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    dtype = images.dtype if images.is_floating_point() else torch.float32
    grid = F.affine_grid(theta.to(images.device, dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images.to(dtype), grid, mode="bilinear", padding_mode="border", align_corners=False)
