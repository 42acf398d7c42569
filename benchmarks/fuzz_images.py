"""The image fuzz of ``benchmarks.fuzz``: a deterministic corpus made with Pillow (valid images in
every accepted format and odd mode, not-images, truncations, huge declared dimensions, mutations),
each sent to ``POST /predict`` as JSON base64 and as a multipart file, plus malformed encodings
around the image bytes. Every answer must be 200 or a 4xx with the error envelope; valid images
must get 200."""

from __future__ import annotations

import base64
import io
import random
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ImageCase", "count_statuses", "image_cases", "png_claiming", "run_image_fuzz"]


@dataclass(frozen=True)
class ImageCase:
    name: str
    data: bytes
    valid: bool  # a decodable image within the limits: must get 200


def _save(img: Any, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header (valid CRCs) that claims ``width`` x ``height`` RGB pixels, with a few
    bytes of pixel data: a decompression bomb's signature without the bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


def _patch_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    at = out.find(b"\xff\xc0")
    if at < 0:
        at = out.find(b"\xff\xc2")
    out[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def image_cases(seed: int = 0, mutations: int = 50) -> list[ImageCase]:
    """The deterministic corpus (see the module docstring)."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    rgb = Image.fromarray(nrng.integers(0, 256, size=(24, 20, 3), dtype=np.uint8), "RGB")
    cases: list[ImageCase] = []

    def add(name: str, data: bytes, valid: bool) -> None:
        cases.append(ImageCase(name, data, valid))

    # Valid images in every format the server takes, and odd but legal ones.
    formats = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF", "ppm": "PPM"}
    valid_bytes = {name: _save(rgb, fmt) for name, fmt in formats.items()}
    for name, data in valid_bytes.items():
        add(f"valid-{name}", data, True)
    for fmt in ("PNG", "JPEG", "GIF", "BMP"):
        add(f"1x1-{fmt.lower()}", _save(Image.new("RGB", (1, 1), (200, 30, 30)), fmt), True)
    add("1x1-L-png", _save(Image.new("L", (1, 1), 7), "PNG"), True)
    add("wide-1000x1-png", _save(Image.new("RGB", (1000, 1), (1, 2, 3)), "PNG"), True)
    add("tall-1x1000-png", _save(Image.new("RGB", (1, 1000), (1, 2, 3)), "PNG"), True)
    modes = {
        "mode-1-png": (Image.new("1", (16, 16), 1), "PNG", {}),
        "mode-L-png": (rgb.convert("L"), "PNG", {}),
        "mode-LA-png": (rgb.convert("LA"), "PNG", {}),
        "mode-P-png": (rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", {}),
        "mode-P-transparency-png": (rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", {"transparency": 0}),
        "mode-RGBA-png": (rgb.convert("RGBA"), "PNG", {}),
        "mode-RGBA-webp": (rgb.convert("RGBA"), "WEBP", {}),
        "mode-I16-png": (Image.fromarray(nrng.integers(0, 65535, size=(12, 12), dtype=np.uint16)), "PNG", {}),
        "mode-I-tiff": (Image.fromarray(nrng.integers(0, 2**31, size=(12, 12), dtype=np.int32)), "TIFF", {}),
        "mode-F-tiff": (Image.fromarray(nrng.random((12, 12), dtype=np.float32)), "TIFF", {}),
        "mode-CMYK-jpeg": (rgb.convert("CMYK"), "JPEG", {}),
        "mode-CMYK-tiff": (rgb.convert("CMYK"), "TIFF", {}),
        "mode-P-gif": (rgb.convert("P", palette=Image.Palette.ADAPTIVE), "GIF", {}),
        "mode-L-jpeg-progressive": (rgb.convert("L"), "JPEG", {"progressive": True}),
    }
    for name, (img, fmt, kwargs) in modes.items():
        add(name, _save(img, fmt, **kwargs), True)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        add(f"exif-orientation-{orientation}-jpeg", _save(rgb, "JPEG", exif=exif.tobytes()), True)
    exif = Image.Exif()
    exif[0x0112] = 99  # out of range
    add("exif-orientation-99-jpeg", _save(rgb, "JPEG", exif=exif.tobytes()), True)
    add(
        "exif-garbage-jpeg",
        _save(rgb, "JPEG", exif=b"Exif\x00\x00" + bytes(rng.randrange(256) for _ in range(64))),
        True,
    )
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    add("animated-gif", _save(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0), True)
    add("animated-webp", _save(frames[0], "WEBP", save_all=True, append_images=frames[1:]), True)
    add("multipage-tiff", _save(frames[0], "TIFF", save_all=True, append_images=frames[1:]), True)

    # Not images, or formats the server does not take.
    add("empty", b"", False)
    for n in (1, 7, 100, 5000):
        add(f"random-{n}-bytes", bytes(rng.randrange(256) for _ in range(n)), False)
    add("text", b"hello, this is not an image\n", False)
    add(
        "svg",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
        False,
    )
    add("postscript", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", False)
    add("pdf-header", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", False)
    add("ico", _save(rgb, "ICO"), False)
    add("pcx", _save(rgb, "PCX"), False)
    add("tga", _save(rgb, "TGA"), False)
    add("png-signature-only", b"\x89PNG\r\n\x1a\n", False)
    add("jpeg-soi-only", b"\xff\xd8\xff", False)

    # Truncations.
    for name in ("png", "jpeg", "gif", "webp", "bmp", "tiff"):
        data = valid_bytes[name]
        for frac in (0.1, 0.5, 0.9):
            add(f"truncated-{name}-{int(frac * 100)}", data[: max(1, int(len(data) * frac))], False)

    # Huge declared dimensions (the decoder must refuse from the header) and a real large image.
    add("png-claims-20000x20000", png_claiming(20000, 20000), False)
    add("png-claims-1000000x1", png_claiming(1_000_000, 1), False)
    add("png-claims-2147483647x2147483647", png_claiming(2**31 - 1, 2**31 - 1), False)
    add("png-claims-0x0", png_claiming(0, 0), False)
    add("jpeg-claims-65500x65500", _patch_jpeg_size(valid_bytes["jpeg"], 65500, 65500), False)
    gif = bytearray(valid_bytes["gif"])
    gif[6:10] = struct.pack("<HH", 65535, 65535)
    add("gif-claims-65535x65535-screen", bytes(gif), False)
    bmp = bytearray(valid_bytes["bmp"])
    bmp[18:26] = struct.pack("<ii", 100_000, 100_000)
    add("bmp-claims-100000x100000", bytes(bmp), False)
    bmp_negative = bytearray(valid_bytes["bmp"])
    bmp_negative[18:26] = struct.pack("<ii", -20, -24)
    add("bmp-negative-size", bytes(bmp_negative), False)
    add("png-48-megapixels-bilevel", _save(Image.new("1", (8000, 6000), 0), "PNG", optimize=True), False)

    # Mutations: bytes flipped in the header or anywhere (a mutated image may still decode: any 200
    # or 4xx is fine, so these are not "valid").
    sources = list(valid_bytes.items())
    for i in range(mutations):
        name, data = sources[i % len(sources)]
        out = bytearray(data)
        where = "header" if i % 2 == 0 else "body"
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(min(len(out), 64)) if where == "header" else rng.randrange(len(out))
            out[pos] = rng.randrange(256)
        add(f"mutated-{where}-{name}-{i}", bytes(out), False)
    return cases


# -- sending -----------------------------------------------------------------------------------------
def count_statuses(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """HTTP status (as a string; 0 = no answer) → how many rows got it."""
    return dict(sorted(Counter(str(r["status"]) for r in rows).items()))


def _envelope_ok(response: Any) -> bool:
    try:
        body = response.json()
        error = body["error"]
        return bool(error["type"]) and bool(error["message"]) and "request_id" in error
    except Exception:
        return False


def run_image_fuzz(url: str, key: str, cases: Sequence[ImageCase], timeout_s: float = 60.0) -> dict[str, Any]:
    """Send every case as JSON base64 and as multipart; count statuses, 5xx, bad envelopes and valid
    images refused."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    rows: list[dict[str, Any]] = []
    with httpx.Client(base_url=url, timeout=timeout_s, headers=headers) as http:

        def send(kind: str, name: str, valid: bool | None, **kwargs: Any) -> None:
            started = time.monotonic()
            try:
                response = http.post("/predict", **kwargs)
                status, envelope, text = response.status_code, None, ""
                if status >= 400:
                    envelope = _envelope_ok(response)
                    text = response.text[:200]
            except httpx.HTTPError as exc:
                status, envelope, text = 0, None, type(exc).__name__
            rows.append(
                {
                    "case": name,
                    "as": kind,
                    "valid": valid,
                    "status": status,
                    "envelope_ok": envelope,
                    "seconds": round(time.monotonic() - started, 4),
                    "detail": text if status >= 500 or status == 0 or (valid and status != 200) else "",
                }
            )

        for case in cases:
            b64 = base64.b64encode(case.data).decode("ascii")
            send("json", case.name, case.valid, json={"images": [b64], "top_k": 3})
            send(
                "multipart",
                case.name,
                case.valid,
                files=[("images", (f"{case.name}.bin", case.data, "application/octet-stream"))],
                data={"top_k": "3"},
            )
        # Encodings around the image bytes.
        png = next((c.data for c in cases if c.name == "valid-png"), cases[0].data)
        b64 = base64.b64encode(png).decode("ascii")
        extras: list[tuple[str, bool | None, dict[str, Any]]] = [
            ("data-url", True, {"json": {"images": [f"data:image/png;base64,{b64}"]}}),
            ("data-url-not-base64", False, {"json": {"images": [f"data:image/png,{b64}"]}}),
            ("base64-invalid-chars", False, {"json": {"images": ["!!!not base64!!!"]}}),
            ("base64-bad-padding", False, {"json": {"images": [b64[:-1]]}}),
            (
                "base64-with-newlines",
                None,
                {"json": {"images": ["\n".join(b64[i : i + 60] for i in range(0, len(b64), 60))]}},
            ),
            ("base64-non-ascii", False, {"json": {"images": ["ÿØÿà" + b64]}}),
            ("base64-empty", False, {"json": {"images": [""]}}),
            ("images-not-a-list", False, {"json": {"images": b64}}),
            ("images-number", False, {"json": {"images": [12345]}}),
            ("no-images", False, {"json": {"images": []}}),
            ("too-many-images", False, {"json": {"images": [b64] * 200}}),
            ("top-k-zero", False, {"json": {"images": [b64], "top_k": 0}}),
            ("top-k-huge", False, {"json": {"images": [b64], "top_k": 10**12}}),
            ("prompt-unknown-task", False, {"json": {"images": [b64], "prompt": {"task": "no such task"}}}),
            ("prompt-garbage", False, {"json": {"images": [b64], "prompt": [1, {"x": None}]}}),
            ("version-missing", False, {"json": {"images": [b64], "version": 999999}}),
            ("version-negative", False, {"json": {"images": [b64], "version": -1}}),
            ("version-2^63", False, {"json": {"images": [b64], "version": 2**63}}),
            ("json-null", False, {"content": b"null", "headers": {"Content-Type": "application/json"}}),
            ("json-truncated", False, {"content": b'{"images": ["', "headers": {"Content-Type": "application/json"}}),
            (
                "json-deep",
                False,
                {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"Content-Type": "application/json"}},
            ),
            (
                "body-huge",
                False,
                {"content": b"{" + b" " * (40 * 2**20) + b"}", "headers": {"Content-Type": "application/json"}},
            ),
            ("content-type-text", False, {"content": b64.encode(), "headers": {"Content-Type": "text/plain"}}),
            ("multipart-no-files", False, {"data": {"top_k": "3"}, "files": [("other", ("x", b"", "text/plain"))]}),
            ("multipart-empty-file", False, {"files": [("images", ("empty.png", b"", "image/png"))]}),
            (
                "multipart-prompt-task-not-a-string",
                False,
                {"files": [("images", ("a.png", png, "image/png"))], "data": {"prompt": '{"task": 5}'}},
            ),
            (
                "multipart-prompt-none",
                True,
                {"files": [("images", ("a.png", png, "image/png"))], "data": {"prompt": "none"}},
            ),
        ]
        for name, valid, kwargs in extras:
            send("request", name, valid, **kwargs)
        ready = http.get("/readyz").status_code
    server_errors = [r for r in rows if r["status"] >= 500 or r["status"] == 0]
    bad_envelopes = [r for r in rows if r["envelope_ok"] is False]
    refused_valid = [r for r in rows if r["valid"] is True and r["status"] != 200]
    return {
        "cases": len(cases),
        "requests": len(rows),
        "statuses": count_statuses(rows),
        "server_errors": len(server_errors),
        "server_error_examples": server_errors[:20],
        "bad_envelopes": len(bad_envelopes),
        "bad_envelope_examples": bad_envelopes[:10],
        "valid_refused": len(refused_valid),
        "valid_refused_examples": refused_valid[:10],
        "ready_after": ready == 200,
        "rows": rows,
    }
