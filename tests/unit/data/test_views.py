"""Random resized crops on preprocessed batches (fmlora.data.views)."""

import pytest
import torch

from fmlora.data import random_resized_views
from fmlora.errors import ConfigError


def test_a_whole_image_crop_is_the_image():
    # A seeded input: bilinear sampling at the pixel centres is exact up to float rounding of the
    # grid, which an unseeded input (the global generator's state depends on test order) could
    # push past a 1e-6 tolerance.
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    same = random_resized_views(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)


def test_a_quarter_area_square_crop_spans_half_of_each_side():
    ramp = torch.linspace(0, 1, 64).expand(8, 1, 64, 64).clone()
    crops = random_resized_views(ramp, torch.Generator().manual_seed(1), scale=(0.25, 0.25), ratio=(1.0, 1.0))
    span = crops[..., -1] - crops[..., 0]  # left-to-right change of the ramp inside each crop
    assert torch.allclose(span, torch.full_like(span, 0.5), atol=0.03)
    assert crops.min() >= 0 and crops.max() <= 1  # never past the border
    # Every image got its own crop position.
    assert len({round(float(c[0, 0, 0]), 4) for c in crops}) == len(crops)


def test_views_are_drawn_from_the_generator_alone():
    x = torch.randn(4, 3, 16, 16)
    a = random_resized_views(x, torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global RNG plays no part
    b = random_resized_views(x, torch.Generator().manual_seed(7))
    c = random_resized_views(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs", [{"scale": (0.0, 1.0)}, {"scale": (0.8, 0.5)}, {"scale": (0.5, 1.2)}, {"ratio": (2.0, 1.0)}]
)
def test_impossible_crops_are_refused(kwargs):
    with pytest.raises(ConfigError):
        random_resized_views(torch.zeros(1, 3, 8, 8), torch.Generator(), **kwargs)


def test_only_image_batches_are_cropped():
    with pytest.raises(ConfigError):
        random_resized_views(torch.zeros(3, 8, 8), torch.Generator())
