import unicodedata

import numpy as np
import pytest
import torch

from fmlora.data.glyphs import (
    BENCHMARK_CHARACTERS,
    FAMILIES,
    GlyphRenderer,
    GlyphSampler,
    _coverage,
    _fonts_for,
    make_glyph_stream,
    pretraining_characters,
)
from fmlora.errors import DataError


def test_benchmark_has_100_classes_each_drawn_by_many_faces():
    assert len(BENCHMARK_CHARACTERS) == len(set(BENCHMARK_CHARACTERS)) == 100
    counts = [len(_fonts_for(c, tuple(FAMILIES))) for c in BENCHMARK_CHARACTERS]
    assert min(counts) >= 6


def test_computer_modern_coverage_is_read_from_glyph_names():
    assert "<" not in _coverage("cmr10.ttf")  # cmr10 draws '¡' at '<'
    assert "$" not in _coverage("cmti10.ttf")  # cmti10 draws '£' at '$'
    assert {"A", "a", "1"} <= _coverage("cmr10.ttf")
    assert "<" in _coverage("cmtt10.ttf")


def test_class_incremental_stream_is_disjoint_and_deterministic():
    tasks = make_glyph_stream("class", num_tasks=10, train_per_class=2, test_per_class=1, seed=0)
    classes = [c for t in tasks for c in t.classes]
    assert len(tasks) == 10 and len(classes) == len(set(classes)) == 100
    again = make_glyph_stream("class", num_tasks=10, train_per_class=2, test_per_class=1, seed=0)
    assert torch.equal(tasks[3].train.images, again[3].train.images)
    other = make_glyph_stream("class", num_tasks=10, train_per_class=2, test_per_class=1, seed=1)
    assert tasks[0].classes != other[0].classes
    assert not torch.equal(tasks[0].train.images[:1], tasks[0].test.images[:1])


def test_domain_incremental_stream_shares_classes_across_families():
    tasks = make_glyph_stream("domain", num_tasks=5, train_per_class=1, test_per_class=1, seed=0)
    assert [t.name for t in tasks] == list(FAMILIES)  # fixed order; the seed drives only the images
    assert all(t.kind == "domain" and t.classes == tasks[0].classes for t in tasks)
    assert len(tasks[0].classes) == 81
    # Every face of every family draws every class: no face gives a class away.
    assert all(c in _coverage(f) for c in tasks[0].classes for fam in FAMILIES.values() for f in fam)
    other = make_glyph_stream("domain", num_tasks=5, train_per_class=1, test_per_class=1, seed=1)
    assert [t.name for t in other] == list(FAMILIES) and not torch.equal(other[0].train.images, tasks[0].train.images)
    with pytest.raises(DataError):
        make_glyph_stream("domain", num_tasks=6)


def test_pretraining_characters_are_disjoint_and_not_look_alikes():
    chars = pretraining_characters(300)
    assert len(set(chars)) == 300 and not set(chars) & set(BENCHMARK_CHARACTERS)
    for char in chars:
        name = unicodedata.name(char)
        assert "LATIN" not in name and ord(char) >= 0x250
        assert not set(unicodedata.normalize("NFKD", char)) & set(BENCHMARK_CHARACTERS)
    # Known leaks seen in a prototype must stay out.
    assert not {"ұ", "∁", "շ", "⎝", "⎠", "а", "о", "Ο"} & set(chars)


def test_em_placement_keeps_case_pairs_apart():
    rng = np.random.default_rng
    small = GlyphRenderer(size=32, augment=False).render("o", "DejaVuSans.ttf", rng(0))
    large = GlyphRenderer(size=32, augment=False).render("O", "DejaVuSans.ttf", rng(0))
    rows_small = np.where((small[0] < 128).any(axis=1))[0]
    rows_large = np.where((large[0] < 128).any(axis=1))[0]
    assert rows_large.min() < rows_small.min() - 2  # 'O' reaches cap height, 'o' only x-height
    assert abs(int(rows_large.max()) - int(rows_small.max())) <= 1  # both sit on the baseline


def test_renderer_draws_visible_ink_with_augmentation():
    rng = np.random.default_rng(0)
    plain = GlyphRenderer(size=32, augment=False).render("A", "DejaVuSans.ttf", rng)
    assert plain.shape == (3, 32, 32) and plain.dtype == np.uint8
    assert (plain < 128).sum() > 30  # dark strokes on white
    a = GlyphRenderer(size=32).render("A", "DejaVuSans.ttf", np.random.default_rng(1))
    b = GlyphRenderer(size=32).render("A", "DejaVuSans.ttf", np.random.default_rng(2))
    assert not np.array_equal(a, b)


def test_sampler_yields_fresh_labelled_batches():
    sampler = GlyphSampler(pretraining_characters(300)[:20], seed=0)
    images, labels = sampler(8)
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.long and int(labels.max()) < 20
    images2, _ = sampler(8)
    assert not torch.equal(images, images2)
