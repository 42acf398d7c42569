"""Fuzzing the HTTP API: schemathesis over every route of the OpenAPI schema, and a Pillow-level image
fuzz on ``POST /predict``; the target is zero 5xx and a server that is still ready afterwards.

1. ``schema``: the schema the server serves (``/openapi.json``; compared with the committed
   ``openapi.json`` when there is one) is loaded with schemathesis and every operation gets
   ``--max-examples`` schema-valid and as many schema-invalid generated requests (Hypothesis, seeded
   with ``--seed``), sent with the admin key (which every route accepts), then a quarter as many
   without the key (the 401/403 paths). Every status is counted; any 5xx or missing response is a
   failure. schemathesis' own conformance checks (response schema, documented status codes) run too
   and are reported, not counted as failures.
2. ``boundary``: edge values (0, -1, 2^31, 2^63-1, 2^63, 10^30, non-numbers; long, dotted, encoded
   strings) in every path and query parameter, one parameter at a time.
3. ``images``: a corpus made with Pillow — random bytes, truncated PNG/JPEG/GIF/WebP/BMP/TIFF, bytes
   flipped in headers and bodies, huge declared dimensions (PNG, JPEG, GIF, BMP headers that claim
   20,000+ px sides, and a real 48-megapixel bilevel PNG), 1x1 images, palette/alpha/16-bit/32-bit/
   float/CMYK modes, EXIF orientations 1-8 and broken EXIF, animated and multi-page files, formats the
   server does not accept, bad base64 and data URLs — each sent as JSON base64 and as a multipart file.
   Every answer must be 200 or a 4xx with the error envelope; valid images must get 200.

    python benchmarks/fuzz.py --out runs/fuzz [--max-examples 100]

Writes ``fuzz.json`` in ``--out``. ``--url URL --key KEY`` fuzzes a server that is already running.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks._common import REPO, write_json

__all__ = ["FuzzConfig", "ImageCase", "image_cases", "run_fuzz", "run_image_fuzz", "run_schema_fuzz"]


@dataclass
class FuzzConfig:
    out: Path
    max_examples: int = 100
    image_mutations: int | None = None  # mutated images (default: max_examples)
    url: str | None = None  # fuzz a running server instead of starting one
    key: str | None = None  # its admin key
    backbone: str = "offline"
    device: str = "cpu"
    threads: int | None = 1
    seed: int = 0
    timeout_s: float = 60.0
    unauthenticated: bool = True
    schema: bool = True  # run schemathesis (needs the schemathesis package)
    operations: tuple[str, ...] | None = None  # e.g. ("POST /predict",); default: every operation


# -- the image corpus ----------------------------------------------------------------------------------
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
def _classify(status: int) -> str:
    if status == 0:
        return "no_response"
    if status >= 500:
        return "5xx"
    if 400 <= status < 500:
        return "4xx"
    return str(status)


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
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    server_errors = [r for r in rows if r["status"] >= 500 or r["status"] == 0]
    bad_envelopes = [r for r in rows if r["envelope_ok"] is False]
    refused_valid = [r for r in rows if r["valid"] is True and r["status"] != 200]
    return {
        "cases": len(cases),
        "requests": len(rows),
        "statuses": dict(sorted(statuses.items())),
        "server_errors": len(server_errors),
        "server_error_examples": server_errors[:20],
        "bad_envelopes": len(bad_envelopes),
        "bad_envelope_examples": bad_envelopes[:10],
        "valid_refused": len(refused_valid),
        "valid_refused_examples": refused_valid[:10],
        "ready_after": ready == 200,
        "rows": rows,
    }


# -- boundary values for path and query parameters ----------------------------------------------------
INT_EDGES: tuple[Any, ...] = (0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, "abc", "1e3", "1.5", "")
STR_EDGES: tuple[str, ...] = ("..", "%2e%2e", "a" * 4000, "null", "é✓", "%00", " ", "-1")


def run_boundary_probes(url: str, key: str, schema: dict[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
    """Edge values (0, -1, 2^63, 10^30, non-numbers, long and odd strings) in every path and query
    parameter of every operation, one at a time; any 5xx is a failure."""
    import urllib.parse

    import httpx

    rows: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, timeout=timeout_s, headers=headers) as http:
        for path, item in sorted(schema.get("paths", {}).items()):
            for method, op in sorted(item.items()):
                if method not in ("get", "post"):
                    continue
                params = op.get("parameters", [])
                defaults = {
                    p["name"]: "1" if p.get("schema", {}).get("type") == "integer" else "x"
                    for p in params
                    if p.get("in") == "path"
                }
                for p in params:
                    if p.get("in") not in ("path", "query"):
                        continue
                    kind = p.get("schema", {}).get("type")
                    values = INT_EDGES if kind == "integer" else STR_EDGES
                    for value in values:
                        filled = dict(defaults)
                        query = {}
                        if p["in"] == "path":
                            filled[p["name"]] = urllib.parse.quote(str(value), safe="%")
                        else:
                            query[p["name"]] = str(value)
                        target = path
                        for name, text in filled.items():
                            target = target.replace("{" + name + "}", text)
                        try:
                            response = http.request(method.upper(), target, params=query)
                            status, text = response.status_code, response.text[:200]
                        except httpx.HTTPError as exc:
                            status, text = 0, type(exc).__name__
                        rows.append(
                            {
                                "operation": f"{method.upper()} {path}",
                                "parameter": p["name"],
                                "value": str(value)[:40],
                                "status": status,
                                "detail": text if status >= 500 or status == 0 else "",
                            }
                        )
    errors = [r for r in rows if r["status"] >= 500 or r["status"] == 0]
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {
        "requests": len(rows),
        "statuses": dict(sorted(statuses.items())),
        "server_errors": len(errors),
        "server_error_examples": errors[:20],
    }


# -- schemathesis ----------------------------------------------------------------------------------------
def run_schema_fuzz(
    url: str,
    key: str | None,
    max_examples: int,
    *,
    seed: int = 0,
    timeout_s: float = 60.0,
    operations: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every operation of the served schema, ``max_examples`` schema-valid and as many schema-invalid
    generated cases each (with ``key`` as a bearer token, or none), seeded with ``seed``. Returns
    status counts per operation and every 5xx case."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=timeout_s)
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    skipped: list[str] = []
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    per_op: dict[str, dict[str, int]] = {}
    server_errors: list[dict[str, Any]] = []
    conformance: dict[str, dict[str, int]] = {}
    load_errors: list[str] = []
    for result in schema.get_all_operations():
        try:
            op = result.ok()
        except Exception as exc:  # an operation schemathesis cannot read is itself a finding
            load_errors.append(f"{type(exc).__name__}: {exc}"[:300])
            continue
        label = f"{op.method.upper()} {op.path}"
        if operations is not None and label not in operations:
            continue
        counts = per_op.setdefault(label, {})
        issues = conformance.setdefault(label, {})

        for mode in modes:
            test = _probe(op, mode, label, url, headers, timeout_s, max_examples, seed, counts, issues, server_errors)
            try:
                test()
            except Exception as exc:  # e.g. no negative case exists for an operation without inputs
                skipped.append(f"{label} ({mode.value}): {type(exc).__name__}: {exc}"[:300])
    total = sum(sum(c.values()) for c in per_op.values())
    return {
        "operations": sorted(per_op),
        "requests": total,
        "statuses": per_op,
        "server_errors": len(server_errors),
        "server_error_examples": server_errors[:20],
        "conformance_findings": {k: v for k, v in conformance.items() if v},
        "operations_not_loaded": load_errors,
        "generation_skipped": skipped,
        "authenticated": bool(key),
    }


def _probe(
    op: Any,
    mode: Any,
    label: str,
    url: str,
    headers: dict[str, str],
    timeout_s: float,
    max_examples: int,
    seed: int,
    counts: dict[str, int],
    issues: dict[str, int],
    server_errors: list[dict[str, Any]],
) -> Any:
    """A Hypothesis test over ``op``'s generated cases that records every answer (it never fails)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from schemathesis.errors import FailureGroup

    @hypothesis_seed(seed)
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def probe(case: Any) -> None:
        response = None
        detail = ""
        try:
            response = case.call(base_url=url, headers=headers, timeout=timeout_s)
            status = response.status_code
        except Exception as exc:
            status, detail = 0, type(exc).__name__
        counts[str(status)] = counts.get(str(status), 0) + 1
        if status >= 500 or status == 0:
            server_errors.append(
                {
                    "operation": label,
                    "mode": mode.value,
                    "status": status,
                    "path_parameters": _short(case.path_parameters),
                    "query": _short(case.query),
                    "body": _short(case.body),
                    "media_type": case.media_type,
                    "response": response.text[:300] if response is not None else detail,
                }
            )
            return
        try:
            case.validate_response(response)
        except (Exception, FailureGroup) as exc:  # conformance findings: reported, not failures
            for failure in getattr(exc, "exceptions", None) or [exc]:
                name = getattr(failure, "title", None) or type(failure).__name__
                issues[name] = issues.get(name, 0) + 1

    return probe


def _short(value: Any, limit: int = 300) -> Any:
    if value is None:
        return None
    try:
        text = json.dumps(value, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _schema_drift(served: dict[str, Any]) -> bool | None:
    committed = REPO / "openapi.json"
    if not committed.is_file():
        return None
    try:
        return json.loads(committed.read_text(encoding="utf-8")) == served
    except (OSError, ValueError):
        return False


# -- the run -------------------------------------------------------------------------------------------------
def run_fuzz(cfg: FuzzConfig) -> dict[str, Any]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    mutations = cfg.image_mutations if cfg.image_mutations is not None else cfg.max_examples
    if cfg.url:
        return _fuzz(cfg, out, cfg.url, cfg.key or "", None, mutations)
    from benchmarks._common import ServerProcess, model_config
    from benchmarks._publish import Publisher
    from fmlora.registry.registry import Registry

    work = Path(tempfile.mkdtemp(prefix="fmlora-fuzz-"))
    try:
        registry = Registry.open(work / "home", model_config(cfg.backbone, work / "weights"))
        publisher = Publisher(registry, seed=cfg.seed)
        publisher.publish(new_task=True, name="letters")
        publisher.publish(new_task=True, name="digits")
        settings = {"device": cfg.device, "api_key": "fuzz-api-key-" + "0" * 16, "poll_interval_s": 0.1}
        with ServerProcess(
            work / "home", settings=settings, threads=cfg.threads, log_path=out / "server.log"
        ) as server:
            return _fuzz(cfg, out, server.url, server.admin_key, server, mutations)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fuzz(cfg: FuzzConfig, out: Path, url: str, key: str, server: Any, mutations: int) -> dict[str, Any]:
    import httpx

    started = time.monotonic()
    served = httpx.get(f"{url}/openapi.json", timeout=cfg.timeout_s).json()
    ops = cfg.operations
    schema_auth: dict[str, Any] = {"operations": [], "server_errors": 0, "server_error_examples": [], "skipped": True}
    if cfg.schema:
        schema_auth = run_schema_fuzz(
            url, key, cfg.max_examples, seed=cfg.seed, timeout_s=cfg.timeout_s, operations=ops
        )
    schema_anon = None
    if cfg.schema and cfg.unauthenticated:
        schema_anon = run_schema_fuzz(
            url, None, max(1, cfg.max_examples // 4), seed=cfg.seed, timeout_s=cfg.timeout_s, operations=ops
        )
    schema_seconds = time.monotonic() - started
    boundary = run_boundary_probes(url, key, served, cfg.timeout_s)
    cases = image_cases(cfg.seed, mutations)
    images = run_image_fuzz(url, key, cases, cfg.timeout_s)
    ready_status = httpx.get(f"{url}/readyz", timeout=cfg.timeout_s).status_code
    alive = server.alive() if server is not None else None
    server_errors = (
        schema_auth["server_errors"]
        + (schema_anon["server_errors"] if schema_anon else 0)
        + boundary["server_errors"]
        + images["server_errors"]
    )
    result = {
        "benchmark": "fuzz",
        "target": "zero 5xx; the server stays ready",
        "verdict": {
            "zero_5xx": server_errors == 0,
            "server_errors": server_errors,
            "ready_after": ready_status == 200,
            "server_alive": alive,
            "valid_images_accepted": images["valid_refused"] == 0,
            "error_envelopes_ok": images["bad_envelopes"] == 0,
        },
        "schema": {
            "source": "served /openapi.json",
            "matches_committed_openapi_json": _schema_drift(served),
            "operations": len(schema_auth["operations"]),
            "max_examples": cfg.max_examples,
            "seconds": round(schema_seconds, 2),
            "with_admin_key": schema_auth,
            "without_key": schema_anon,
        },
        "boundary": boundary,
        "images": {k: v for k, v in images.items() if k != "rows"},
        "image_rows": images["rows"],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "key"},
    }
    write_json(out / "fuzz.json", result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-examples", type=int, default=100, help="schemathesis examples per operation")
    p.add_argument("--image-mutations", type=int, default=None, help="mutated images (default: --max-examples)")
    p.add_argument("--url", default=None, help="fuzz a running server instead of starting one")
    p.add_argument("--key", default=None, help="the running server's admin key (with --url)")
    p.add_argument("--backbone", default="offline")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = FuzzConfig(
        out=args.out,
        max_examples=args.max_examples,
        image_mutations=args.image_mutations,
        url=args.url,
        key=args.key,
        backbone=args.backbone,
        device=args.device,
        threads=args.threads or None,
        seed=args.seed,
    )
    result = run_fuzz(cfg)
    print(json.dumps({"verdict": result["verdict"], "image_statuses": result["images"]["statuses"]}, indent=2))
    for example in result["schema"]["with_admin_key"]["server_error_examples"][:5]:
        print("5xx:", json.dumps(example)[:400])
    for example in result["boundary"]["server_error_examples"][:10]:
        print("5xx:", json.dumps(example)[:400])
    for example in result["images"]["server_error_examples"][:5]:
        print("5xx:", json.dumps(example)[:400])
    return 0 if result["verdict"]["zero_5xx"] and result["verdict"]["ready_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
