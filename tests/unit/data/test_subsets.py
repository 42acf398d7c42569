"""Per-class subsets of an image source (fmlora.data.images.first_per_class, after_first_per_class)."""

import pytest
import torch

from fmlora.data import ConcatImages, ImageSet, SubsetImages, after_first_per_class, first_per_class
from fmlora.errors import DataError


def _images(labels: list[int]) -> ImageSet:
    n = len(labels)
    pixels = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return ImageSet(pixels, torch.tensor(labels), ("a", "b", "c"))


def test_the_first_images_of_each_class_are_kept_in_order():
    source = _images([0, 1, 0, 2, 0, 1, 0, 1])
    kept = first_per_class(source, 2)
    assert kept.labels.tolist() == [0, 1, 0, 2, 1]
    # Images 0, 1, 2, 3, 5: a class with fewer than two keeps what it has.
    assert kept.fetch(torch.arange(len(kept)))[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 5]
    assert first_per_class(source, 10).labels.tolist() == source.labels.tolist()


def test_the_rest_is_what_the_first_images_leave_out():
    source = _images([0, 1, 0, 2, 0, 1, 0, 1])
    rest = after_first_per_class(source, 2)
    assert rest.labels.tolist() == [0, 0, 1] and rest.fetch(torch.arange(3))[:, 0, 0, 0].tolist() == [4, 6, 7]
    with pytest.raises(DataError, match="nothing is left after the first 10"):
        after_first_per_class(source, 10)
    joined = ConcatImages((_images([0, 0, 0]), _images([1, 1, 2])))
    assert after_first_per_class(joined, 1).labels.tolist() == [0, 0, 1]


def test_a_source_on_disk_or_joined_is_subset_lazily():
    joined = ConcatImages((_images([0, 0, 0]), _images([1, 1, 2])))
    kept = first_per_class(joined, 1)
    assert isinstance(kept, SubsetImages) and kept.classes == joined.classes
    assert kept.labels.tolist() == [0, 1, 2]
    assert kept.fetch(torch.tensor([2, 0]))[:, 0, 0, 0].tolist() == [2, 0]


def test_keeping_no_image_is_refused():
    with pytest.raises(DataError):
        first_per_class(_images([0, 1]), 0)
