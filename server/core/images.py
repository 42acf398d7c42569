"""Image bytes → RGB arrays, safely; arrays → the model's input size, exactly as training prepares them.

``decode_image`` reads the header first and refuses an image whose pixel count exceeds the limit
before a single pixel is decoded (decompression bombs), applies the EXIF orientation, and turns
every decoding failure (garbage, truncated files, unsupported formats) into ``InvalidImageInput``.
It accepts only common raster formats: Pillow's rarer plugins (EPS, which runs Ghostscript, and
friends) are never reached from the network.

``resize_for_model`` is the serving twin of ``fmlora.data.images._load_rgb`` (how uploaded task images are
resized for training): shorter side to ``max(size) / crop_pct`` with bicubic resampling, then a centre
crop. A test holds the two equal pixel for pixel; the normalisation that follows comes from the
model's timm data config through ``model.preprocessor``. ``Resizer`` does it for a request's images
in a thread pool (Pillow releases the GIL while it resamples).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from fmlora.data.images import resize_center_crop
from server.core.errors import ImageTooLarge, InvalidImageInput

__all__ = [
    "DEFAULT_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "Resizer",
    "as_rgb_array",
    "decode_image",
    "prepare_image",
    "resize_for_model",
]

# Below Pillow's own bomb threshold (Image.MAX_IMAGE_PIXELS, ~89 MP), so our check always runs first.
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    formats: Sequence[str] = DEFAULT_FORMATS,
) -> np.ndarray:
    """Decode ``data`` into an RGB uint8 array of shape (H, W, 3), EXIF orientation applied.

    Raises ``ImageTooLarge`` when width x height (from the header) exceeds ``max_pixels`` and
    ``InvalidImageInput`` for anything that is not a complete image in one of ``formats``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImageInput(f"image data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidImageInput("the image is empty")
    if max_pixels < 1:
        raise ValueError("max_pixels must be positive")
    try:
        img = Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"the image has more pixels than the limit of {max_pixels}") from None
    except Exception:
        raise InvalidImageInput(
            f"the data is not a decodable image (supported formats: {', '.join(formats)})"
        ) from None
    with img:
        width, height = img.size
        if width < 1 or height < 1:
            raise InvalidImageInput("the image has no pixels")
        if width * height > max_pixels:
            raise ImageTooLarge(f"the image is {width}x{height} pixels, more than the limit of {max_pixels} pixels")
        try:
            img.load()
        except Image.DecompressionBombError:
            raise ImageTooLarge(f"the image has more pixels than the limit of {max_pixels}") from None
        except Exception:
            raise InvalidImageInput(f"the {img.format or 'image'} data is truncated or corrupt") from None
        img = _apply_exif_orientation(img)
        try:
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            array = np.asarray(rgb, dtype=np.uint8)
        except Exception:
            raise InvalidImageInput("the image cannot be converted to RGB") from None
    if array.ndim != 3 or array.shape[2] != 3:
        raise InvalidImageInput("the image cannot be converted to RGB")
    return array


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF orientation tag says; broken metadata leaves the pixels as they are."""
    try:
        transposed = ImageOps.exif_transpose(img)
    except Exception:
        return img
    return img if transposed is None else transposed


def as_rgb_array(image: Any) -> np.ndarray:
    """Validate an in-memory image for the engine: uint8 (H, W, 3) RGB, (H, W) grey or (H, W, 4)
    RGBA (alpha dropped, as ``Image.convert('RGB')`` does for training images)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if not isinstance(image, np.ndarray):
        raise InvalidImageInput(f"an image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InvalidImageInput(f"an image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidImageInput(f"an image must have shape (H, W, 3), got {tuple(image.shape)}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidImageInput("the image has no pixels")
    return image


def resize_for_model(image: np.ndarray | Image.Image, size: tuple[int, int], crop_pct: float = 1.0) -> np.ndarray:
    """``fmlora.data.images.resize_center_crop``: the resize/crop training uses, so serving sees the same pixels.

    Raises ``DataError`` (a ``ValueError``) for a ``crop_pct`` outside (0, 1]."""
    return resize_center_crop(image, size, crop_pct)


def prepare_image(image: Any, size: tuple[int, int], crop_pct: float = 1.0) -> np.ndarray:
    """``as_rgb_array`` then ``resize_for_model``: any accepted image → uint8 (H, W, 3) at ``size``."""
    return resize_for_model(as_rgb_array(image), size, crop_pct)


class Resizer:
    """Validates a request's images and brings them to the model's input size, split over a pool."""

    def __init__(self, size: tuple[int, int], crop_pct: float, threads: int) -> None:
        self.size = size
        self.crop_pct = crop_pct
        self.threads = threads
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, "fmlora-preprocess")

    def resize(self, images: Sequence[Any], first: int = 0) -> list[np.ndarray]:
        """Validate and resize ``images`` here; errors name the image by its index in the request."""
        out = []
        for i, image in enumerate(images):
            try:
                out.append(resize_for_model(as_rgb_array(image), self.size, self.crop_pct))
            except InvalidImageInput as exc:
                raise InvalidImageInput(f"image {first + i}: {exc.message}") from None
        return out

    async def prepare(self, images: Sequence[Any]) -> list[np.ndarray]:
        """``resize`` in the pool, in up to ``threads`` runs; inline when nothing needs resampling."""
        if self.crop_pct == 1.0 and all(isinstance(im, np.ndarray) and im.shape[:2] == self.size for im in images):
            return self.resize(images)
        n = len(images)
        parts = max(1, min(self.threads, n))
        bounds = [round(i * n / parts) for i in range(parts + 1)]
        loop = asyncio.get_running_loop()
        runs = [
            loop.run_in_executor(self._pool, self.resize, images[bounds[i] : bounds[i + 1]], bounds[i])
            for i in range(parts)
        ]
        return [image for run in await asyncio.gather(*runs) for image in run]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
