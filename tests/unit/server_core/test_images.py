"""Image decoding: garbage, truncation, bombs, EXIF, modes; resizing equals the training path."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmlora.data.images import _load_rgb
from fmlora.errors import DataError
from server.core.errors import ImageTooLarge, InvalidImageInput
from server.core.images import as_rgb_array, decode_image, prepare_image, resize_for_model

LIMIT = 10_000_000


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR for width x height RGB, and a tiny IDAT: no pixel data to speak of."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def noise(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "data", [b"", b"not an image at all", bytes(range(256)) * 4, b"\x89PNG\r\n\x1a\n" + b"\0" * 40]
)
def test_garbage_is_invalid(data):
    with pytest.raises(InvalidImageInput) as info:
        decode_image(data, LIMIT)
    assert info.value.status_code == 400 and info.value.error_type == "invalid_image"
    assert isinstance(info.value, DataError)  # a mapping for the library's errors answers it the same


def test_truncated_jpeg_is_invalid():
    data = encode(noise(64, 64), "JPEG", quality=90)
    assert decode_image(data, LIMIT).shape == (64, 64, 3)
    with pytest.raises(InvalidImageInput, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], LIMIT)


def test_one_pixel_image_decodes_and_resizes():
    data = encode(Image.new("RGB", (1, 1), (200, 10, 30)))
    array = decode_image(data, LIMIT)
    assert array.shape == (1, 1, 3) and tuple(array[0, 0]) == (200, 10, 30)
    resized = prepare_image(array, (32, 32))
    assert resized.shape == (32, 32, 3) and resized.dtype == np.uint8
    assert np.all(resized == np.array([200, 10, 30], dtype=np.uint8))


def test_huge_png_header_is_refused_before_decoding():
    data = png_header(20000, 20000)
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge) as info:
            decode_image(data, LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.status_code == 413 and info.value.error_type == "image_too_large"
    assert peak < 5_000_000  # a decoded 20000x20000 RGB image would be 1.2 GB


def test_pillow_bomb_guard_is_also_mapped_to_too_large():
    # A limit above Pillow's own threshold: Pillow refuses first, still ImageTooLarge.
    with pytest.raises(ImageTooLarge):
        decode_image(png_header(20000, 20000), 10**12)


def test_pixel_limit_is_exact_and_checked_from_the_header():
    data = encode(noise(10, 20))
    assert decode_image(data, 200).shape == (10, 20, 3)
    with pytest.raises(ImageTooLarge, match="20x10 pixels"):
        decode_image(data, 199)
    # Only the header is needed to refuse: the pixel data can be missing entirely.
    with pytest.raises(ImageTooLarge, match="5000x4000"):
        decode_image(png_header(5000, 4000), LIMIT)


def test_exif_orientation_is_applied():
    # Left half red, right half blue, 40 wide x 20 high; orientation 6 = rotate 90° clockwise to display.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    img = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    array = decode_image(encode(img, "JPEG", quality=95, exif=exif.tobytes()), LIMIT)
    assert array.shape == (40, 20, 3)  # displayed upright: 20 wide x 40 high
    top, bottom = array[:15].reshape(-1, 3).mean(0), array[25:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_modes_become_rgb(mode):
    img = noise(12, 9).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        img = img.convert("I").point(lambda v: v * 256).convert("I;16")
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    array = decode_image(encode(img, fmt), LIMIT)
    assert array.shape == (12, 9, 3) and array.dtype == np.uint8


def test_unsupported_formats_are_not_parsed():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    with pytest.raises(InvalidImageInput, match="supported formats"):
        decode_image(eps, LIMIT)
    ico = encode(noise(16, 16), "ICO")
    with pytest.raises(InvalidImageInput):
        decode_image(ico, LIMIT)
    assert decode_image(ico, LIMIT, formats=("ICO",)).shape[2] == 3


def test_non_bytes_is_invalid():
    with pytest.raises(InvalidImageInput):
        decode_image("a string", LIMIT)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("shape", "size", "crop"),
    [((50, 80), (32, 32), 1.0), ((80, 50), (32, 32), 0.9), ((1, 1), (32, 32), 1.0), ((300, 7), (24, 40), 0.875)],
)
def test_resize_equals_the_training_loader(tmp_path: Path, shape, size, crop):
    img = noise(*shape, seed=3)
    path = tmp_path / "x.png"
    img.save(path)
    served = resize_for_model(decode_image(path.read_bytes(), LIMIT), size, crop)
    trained = _load_rgb(path, size, crop)
    assert served.shape == (*size, 3)
    np.testing.assert_array_equal(served, trained)


def test_as_rgb_array_validates_and_normalises_layouts():
    grey = np.full((5, 6), 7, dtype=np.uint8)
    assert as_rgb_array(grey).shape == (5, 6, 3)
    rgba = np.zeros((5, 6, 4), dtype=np.uint8)
    assert as_rgb_array(rgba).shape == (5, 6, 3)
    assert as_rgb_array(Image.new("L", (6, 5))).shape == (5, 6, 3)
    for bad in (
        np.zeros((5, 6, 3), dtype=np.float32),
        np.zeros((5, 6, 2), dtype=np.uint8),
        [[1, 2]],
        np.zeros((0, 4, 3), np.uint8),
    ):
        with pytest.raises(InvalidImageInput):
            as_rgb_array(bad)


def test_same_size_image_is_not_resampled():
    array = np.asarray(noise(32, 32, seed=9))
    assert np.array_equal(resize_for_model(array, (32, 32), 1.0), array)
