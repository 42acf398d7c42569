"""The weak-backbone stream: glyphs under a grating (fmlora.data.grating)."""

import torch

from fmlora.data import make_glyph_stream, make_grating_stream


def test_grating_stream_keeps_tasks_and_labels_and_is_seeded():
    clean = make_glyph_stream("class", 2, 2, 1, seed=3)
    weak, again = make_grating_stream(2, 2, 1, seed=3), make_grating_stream(2, 2, 1, seed=3)
    for c, w, a in zip(clean, weak, again, strict=True):
        assert w.name == c.name and w.classes == c.classes and torch.equal(w.train.labels, c.train.labels)
        assert w.train.images.dtype == torch.uint8 and w.train.images.shape == c.train.images.shape
        assert torch.equal(w.train.images, a.train.images) and torch.equal(w.test.images, a.test.images)
        assert not torch.equal(w.train.images, c.train.images)
        # Grey output, and the grating spreads intensities well beyond the clean render's two tones.
        assert torch.equal(w.train.images[:, 0], w.train.images[:, 1])
        assert len(w.train.images[0, 0].unique()) > 20
