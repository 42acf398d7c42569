"""Image inputs: paths, bytes, file objects, PIL images and numpy arrays; batching and its bounds."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import fmlora_client as fc
import numpy as np
import pytest
from fmlora_client._images import encode_image, encode_png, iter_batches, iter_images, sniff_content_type
from PIL import Image


def _png_bytes(color=(255, 0, 0), size=(4, 3)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_path_is_sent_as_is(tmp_path):
    path = tmp_path / "robin.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0jpeg-data")
    encoded = encode_image(path)
    assert encoded.filename == "robin.jpg"
    assert encoded.data == b"\xff\xd8\xff\xe0jpeg-data"
    assert encoded.content_type == "image/jpeg"
    assert encode_image(str(path)).data == encoded.data


def test_path_with_unknown_suffix_is_sniffed(tmp_path):
    path = tmp_path / "noext"
    path.write_bytes(_png_bytes())
    assert encode_image(path).content_type == "image/png"


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        encode_image(tmp_path / "absent.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(fc.InvalidInputError):
        encode_image(tmp_path / "empty.png")


@pytest.mark.parametrize(
    ("data", "ctype"),
    [
        (b"\x89PNG\r\n\x1a\n....", "image/png"),
        (b"\xff\xd8\xff\xdb....", "image/jpeg"),
        (b"GIF89a....", "image/gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"BM......", "image/bmp"),
        (b"something else", "application/octet-stream"),
    ],
)
def test_bytes_are_sniffed(data, ctype):
    assert sniff_content_type(data)[0] == ctype
    encoded = encode_image(bytearray(data), 7)
    assert encoded.data == data and encoded.content_type == ctype
    assert encoded.filename.startswith("image-7")


def test_empty_bytes_are_rejected():
    with pytest.raises(fc.InvalidInputError):
        encode_image(b"")


def test_binary_file_objects(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(_png_bytes())
    with path.open("rb") as handle:
        encoded = encode_image(handle)
    assert encoded.filename == "x.png" and encoded.content_type == "image/png"
    assert encode_image(io.BytesIO(_png_bytes())).filename == "image-0.png"
    with pytest.raises(fc.InvalidInputError, match="binary"):
        encode_image(io.StringIO("text"))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "F"])
def test_pil_images_become_png(mode):
    image = Image.new("RGB", (5, 4), (10, 200, 30)).convert(mode)
    encoded = encode_image(image)
    assert encoded.content_type == "image/png" and encoded.filename.endswith(".png")
    decoded = Image.open(io.BytesIO(encoded.data))
    assert decoded.size == (5, 4)


@pytest.mark.parametrize("channels", [None, 1, 3, 4])
def test_numpy_arrays_become_lossless_png(channels):
    rng = np.random.default_rng(0)
    shape = (6, 9) if channels is None else (6, 9, channels)
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    encoded = encode_image(array)
    assert encoded.content_type == "image/png"
    decoded = _decode(encoded.data)
    expected = array[..., 0] if channels == 1 else array
    np.testing.assert_array_equal(decoded, expected)


def test_non_contiguous_arrays_encode_their_logical_pixels():
    array = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    view = array[:, ::2, :]  # strided
    np.testing.assert_array_equal(_decode(encode_image(view).data), view)
    transposed = np.ascontiguousarray(array.transpose(1, 0, 2)).transpose(1, 0, 2)  # Fortran-like layout
    np.testing.assert_array_equal(_decode(encode_image(transposed).data), array)


def test_bad_arrays_are_explained():
    with pytest.raises(fc.InvalidInputError, match="uint8"):
        encode_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(fc.InvalidInputError, match="channels first"):
        encode_image(np.zeros((3, 8, 8), dtype=np.uint8))
    with pytest.raises(fc.InvalidInputError):
        encode_image(np.zeros((0, 8, 3), dtype=np.uint8))


def test_unsupported_inputs_are_explained():
    with pytest.raises(fc.InvalidInputError, match="unsupported image input of type int"):
        encode_image(42)


def test_encode_png_is_valid_without_pillow():
    pixels = bytes(range(2 * 3 * 3))
    data = encode_png(pixels, width=3, height=2, channels=3)
    np.testing.assert_array_equal(_decode(data), np.frombuffer(pixels, dtype=np.uint8).reshape(2, 3, 3))
    with pytest.raises(fc.InvalidInputError):
        encode_png(b"\x00", width=3, height=2, channels=3)


def test_iter_images_shapes(tmp_path):
    batch = np.zeros((5, 4, 4, 3), dtype=np.uint8)
    assert len(list(iter_images(batch))) == 5  # NHWC batch
    assert len(list(iter_images(batch[0]))) == 1  # one HxWx3 image
    assert len(list(iter_images(b"\x89PNG"))) == 1
    assert len(list(iter_images(str(tmp_path / "a.png")))) == 1
    assert len(list(iter_images([batch, batch[0]]))) == 6  # a batch inside a list is flattened
    assert len(list(iter_images(x for x in [b"a", b"b"]))) == 2


def test_batches_are_bounded_by_count_and_bytes():
    images = [bytes([1]) * 10 for _ in range(7)]
    sizes = [len(b) for b in iter_batches(images, batch_size=3, max_batch_bytes=10_000)]
    assert sizes == [3, 3, 1]
    sizes = [len(b) for b in iter_batches(images, batch_size=100, max_batch_bytes=25)]
    assert sizes == [2, 2, 2, 1]
    big = [b"x" * 100, b"y", b"z"]
    assert [len(b) for b in iter_batches(big, batch_size=10, max_batch_bytes=50)] == [1, 2]  # oversize goes alone
    with pytest.raises(fc.InvalidInputError):
        list(iter_batches(images, batch_size=0, max_batch_bytes=10))


def test_encoding_is_lazy():
    def generate():
        yield b"\x89PNG-1"
        yield b"\x89PNG-2"
        raise AssertionError("read past the first batch before it was sent")

    batches = iter_batches(generate(), batch_size=2, max_batch_bytes=10_000)
    assert len(next(batches)) == 2


def test_bytes_and_arrays_need_neither_numpy_nor_pillow():
    """Arrays are duck-typed and PNG-encoded with zlib: nothing heavy is imported to encode them."""
    code = textwrap.dedent(
        """
        import sys
        import fmlora_client
        from fmlora_client._images import encode_image

        class FakeArray:  # the numpy surface the encoder uses
            shape, dtype, ndim = (2, 2, 3), "uint8", 3
            def tobytes(self):
                return bytes(12)

        assert encode_image(FakeArray()).data.startswith(b"\\x89PNG")
        assert encode_image(b"\\xff\\xd8\\xff").content_type == "image/jpeg"
        print(sorted(m for m in ("numpy", "PIL") if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
