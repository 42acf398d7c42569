"""Data: image sources and task streams (the offline glyph benchmark, the paper datasets, synthetic
streams), the shared resize/crop, and task archives.

Imports only ``fmlora.errors`` and third-party libraries.
"""

from .archive import write_task_archive
from .datasets import PAPER_BENCHMARKS, load_cifar100, load_cub200, load_domainnet, load_imagenet_r
from .glyphs import (
    BENCHMARK_CHARACTERS,
    FAMILIES,
    GlyphRenderer,
    GlyphSampler,
    font_directory,
    make_glyph_stream,
    pretraining_characters,
    render_pretraining_set,
)
from .grating import grating, make_grating_stream
from .images import (
    ConcatImages,
    FileImageSet,
    ImageSet,
    ImageSource,
    SubsetImages,
    TaskData,
    after_first_per_class,
    batches,
    concat_sources,
    first_per_class,
)
from .loader import LoaderConfig, image_batches, train_transform
from .synthetic import make_synthetic_stream
from .views import random_resized_views

__all__ = [
    "BENCHMARK_CHARACTERS",
    "FAMILIES",
    "PAPER_BENCHMARKS",
    "ConcatImages",
    "FileImageSet",
    "GlyphRenderer",
    "GlyphSampler",
    "ImageSet",
    "ImageSource",
    "LoaderConfig",
    "SubsetImages",
    "TaskData",
    "after_first_per_class",
    "batches",
    "concat_sources",
    "first_per_class",
    "font_directory",
    "grating",
    "image_batches",
    "load_cifar100",
    "load_cub200",
    "load_domainnet",
    "load_imagenet_r",
    "make_glyph_stream",
    "make_grating_stream",
    "make_synthetic_stream",
    "pretraining_characters",
    "random_resized_views",
    "render_pretraining_set",
    "train_transform",
    "write_task_archive",
]
