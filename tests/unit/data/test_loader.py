"""Decode workers and timm's training augmentation (fmlora.data.loader)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmlora.data import FileImageSet, ImageSet, LoaderConfig, batches, image_batches
from fmlora.errors import DataError

DATA_CONFIG = {"input_size": (3, 16, 16), "interpolation": "bilinear", "crop_pct": 1.0}


def _images(n: int = 12) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    return ImageSet(images, torch.arange(n) % 3, ("a", "b", "c"))


def test_without_workers_or_augmentation_it_is_exactly_batches():
    data = _images()
    plain = list(batches(data, 5, shuffle=True, generator=torch.Generator().manual_seed(3)))
    read = list(image_batches(data, 5, shuffle=True, generator=torch.Generator().manual_seed(3)))
    assert len(plain) == len(read) == 3
    for (x1, y1), (x2, y2) in zip(plain, read, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_workers_give_the_same_batches_in_the_same_order():
    data = _images()
    plain = list(batches(data, 4))
    read = list(image_batches(data, 4, loader=LoaderConfig(workers=2)))
    assert [torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, read, strict=True)] == [True] * 3


def test_augmentation_is_random_per_epoch_but_reproducible_from_the_generator(tmp_path: Path):
    paths = []
    rng = np.random.default_rng(0)
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    data = FileImageSet(tuple(paths), torch.tensor([0, 1, 0, 1, 0, 1]), ("x", "y"), image_size=(16, 16))
    loader = LoaderConfig(workers=1, augment=True)

    def run(seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [x for x, _ in image_batches(data, 3, loader=loader, data_config=DATA_CONFIG, shuffle=True, generator=g)]

    first, again, other = run(1), run(1), run(2)
    assert all(x.dtype == torch.uint8 and tuple(x.shape) == (3, 3, 16, 16) for x in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # The crop comes from the original 40x30 file, so it differs from the eval resize of the same image.
    eval_view = next(iter(batches(data, 6)))[0]
    assert not any(torch.equal(x[0], e) for x in first for e in eval_view)


def test_augmentation_needs_the_data_config():
    with pytest.raises(DataError, match="data config"):
        next(image_batches(_images(), 4, loader=LoaderConfig(augment=True)))
