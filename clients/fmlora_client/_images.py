"""Turn what users hold into image bytes for upload: paths, bytes, file objects, PIL images, numpy arrays.

Nothing heavy is imported here: a PIL image is recognised by duck typing and saved through its own
``save``; a numpy array is recognised by its ``shape``/``dtype``/``tobytes`` and written as PNG with the
standard library (zlib), so numpy arrays need neither Pillow nor an ``import numpy``.
"""

from __future__ import annotations

import io
import mimetypes
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidInputError

# One image: a path, encoded bytes, a binary file, a PIL image or a uint8 array (duck-typed, so ``Any``).
ImageInput = Any

_MAGIC: tuple[tuple[bytes, str, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png", ".png"),
    (b"\xff\xd8\xff", "image/jpeg", ".jpg"),
    (b"GIF87a", "image/gif", ".gif"),
    (b"GIF89a", "image/gif", ".gif"),
    (b"BM", "image/bmp", ".bmp"),
    (b"II*\x00", "image/tiff", ".tif"),
    (b"MM\x00*", "image/tiff", ".tif"),
)


@dataclass(frozen=True)
class EncodedImage:
    """One image ready to send: a file name for multipart, its bytes and content type."""

    filename: str
    data: bytes
    content_type: str


def sniff_content_type(data: bytes) -> tuple[str, str]:
    """(content type, extension) from magic bytes; application/octet-stream when unknown."""
    for magic, ctype, ext in _MAGIC:
        if data.startswith(magic):
            return ctype, ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", ".webp"
    return "application/octet-stream", ".bin"


def _is_pil_image(obj: object) -> bool:
    module = type(obj).__module__ or ""
    return (module == "PIL" or module.startswith("PIL.")) and hasattr(obj, "save") and hasattr(obj, "mode")


def _is_array(obj: object) -> bool:
    return hasattr(obj, "shape") and hasattr(obj, "dtype") and hasattr(obj, "tobytes") and hasattr(obj, "ndim")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def encode_png(pixels: bytes, width: int, height: int, channels: int) -> bytes:
    """A PNG of 8-bit pixels in row-major HxWxC order (C = 1 gray, 3 RGB, 4 RGBA). Standard library only."""
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    stride = width * channels
    if len(pixels) != stride * height:
        raise InvalidInputError(f"expected {stride * height} pixel bytes, got {len(pixels)}")
    # Filter type 0 (None) on every scanline: simple, deterministic; zlib does the compressing.
    raw = b"".join(b"\x00" + pixels[y * stride : (y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw, 6))
        + _png_chunk(b"IEND", b"")
    )


def _encode_array(array: Any, name: str) -> EncodedImage:
    shape = tuple(int(s) for s in array.shape)
    if str(array.dtype) != "uint8":
        raise InvalidInputError(
            f"{name}: arrays must be uint8 (HxWx3, values 0-255), got dtype {array.dtype}; "
            "scale and cast first, e.g. (x * 255).clip(0, 255).astype('uint8')"
        )
    if len(shape) == 2:
        height, width, channels = shape[0], shape[1], 1
    elif len(shape) == 3 and shape[2] in (1, 3, 4):
        height, width, channels = shape
    else:
        hint = " (channels first? transpose to HxWxC)" if len(shape) == 3 and shape[0] in (1, 3, 4) else ""
        raise InvalidInputError(f"{name}: arrays must be HxW or HxWxC with C in 1, 3, 4, got shape {shape}{hint}")
    if height == 0 or width == 0:
        raise InvalidInputError(f"{name}: empty image of shape {shape}")
    # tobytes() is C-ordered whatever the array's memory layout, so strided views encode correctly.
    return EncodedImage(f"{name}.png", encode_png(array.tobytes(), width, height, channels), "image/png")


def _encode_pil(image: Any, name: str) -> EncodedImage:
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return EncodedImage(f"{name}.png", buffer.getvalue(), "image/png")


def _encode_bytes(data: bytes, name: str) -> EncodedImage:
    if not data:
        raise InvalidInputError(f"{name}: empty image bytes")
    ctype, ext = sniff_content_type(data)
    return EncodedImage(f"{name}{ext}", data, ctype)


def encode_image(image: ImageInput, index: int = 0) -> EncodedImage:
    """Bytes and a content type for one image input.

    Accepts a path (``str`` or ``os.PathLike``), raw encoded bytes (``bytes``/``bytearray``/``memoryview``),
    a binary file object, a PIL image, or a numpy-like uint8 array of shape HxW / HxWx1 / HxWx3 / HxWx4.
    Paths and bytes are sent as they are (the server decodes them); PIL images and arrays become PNG.
    """
    name = f"image-{index}"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"no such image file: {path}")
        data = path.read_bytes()
        if not data:
            raise InvalidInputError(f"{path}: empty file")
        ctype = mimetypes.guess_type(path.name)[0]
        if not ctype or not ctype.startswith("image/"):
            ctype = sniff_content_type(data)[0]
        return EncodedImage(path.name, data, ctype)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _encode_bytes(bytes(image), name)
    if _is_pil_image(image):
        return _encode_pil(image, name)
    if _is_array(image):
        return _encode_array(image, name)
    if hasattr(image, "read"):
        data = image.read()
        if isinstance(data, str):
            raise InvalidInputError(f"{name}: file objects must be opened in binary mode ('rb')")
        filename = Path(str(getattr(image, "name", "") or "")).name
        encoded = _encode_bytes(bytes(data), name)
        return EncodedImage(filename, encoded.data, encoded.content_type) if filename else encoded
    raise InvalidInputError(
        f"{name}: unsupported image input of type {type(image).__name__}; "
        "pass a path, bytes, a binary file, a PIL image or a uint8 HxWx3 numpy array"
    )


def iter_images(images: Any) -> Iterator[Any]:
    """The individual images in ``images``: one image, an iterable of images, or an NHWC uint8 array."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)) or _is_pil_image(images):
        yield images
        return
    if _is_array(images):
        if int(images.ndim) == 4:  # a batch: N x H x W x C
            yield from (images[i] for i in range(int(images.shape[0])))
        else:
            yield images
        return
    if hasattr(images, "read"):
        yield images
        return
    if isinstance(images, Iterable):
        for item in images:
            if _is_array(item) and int(item.ndim) == 4:
                yield from iter_images(item)
            else:
                yield item
        return
    yield images  # let encode_image explain what is wrong with it


def iter_batches(images: Any, batch_size: int, max_batch_bytes: int) -> Iterator[list[EncodedImage]]:
    """Encode lazily and group into batches of at most ``batch_size`` images and ``max_batch_bytes`` bytes.

    An image larger than ``max_batch_bytes`` on its own still goes, alone (the server judges its size).
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[EncodedImage] = []
    size = 0
    for index, image in enumerate(iter_images(images)):
        encoded = encode_image(image, index)
        if batch and size + len(encoded.data) > max_batch_bytes:
            yield batch
            batch, size = [], 0
        batch.append(encoded)
        size += len(encoded.data)
        if len(batch) >= batch_size:  # send a full batch before reading (encoding) the next image
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
