"""Load generation: seeded images, request bodies for POST /predict, and closed-loop HTTP load from
asyncio httpx clients in this process (``http_load``)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.report import summarize

__all__ = ["LoadResult", "encode_image", "http_load", "http_load_async", "predict_body", "random_images"]


def random_images(n: int, size: int | tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """``n`` seeded RGB uint8 images of ``size`` (smooth noise: compresses like a photo, not like static)."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
        big = np.kron(small, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]
        if big.shape[:2] != (h, w):
            big = np.pad(big, ((0, h - big.shape[0]), (0, w - big.shape[1]), (0, 0)), mode="edge")
        noise = rng.integers(0, 16, size=(h, w, 3), dtype=np.uint8)
        images.append(np.ascontiguousarray(big // 16 * 15 + noise))
    return images


def encode_image(array: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> bytes:
    """An RGB uint8 array as JPEG or PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(array, "RGB")
    if fmt.lower() in ("jpeg", "jpg"):
        image.save(buf, "JPEG", quality=quality)
    elif fmt.lower() == "png":
        image.save(buf, "PNG")
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


def predict_body(blobs: Iterable[bytes], top_k: int = 5, prompt: Any = "auto", version: int | None = None) -> bytes:
    """The JSON body of POST /predict for encoded images (base64)."""
    body: dict[str, Any] = {
        "images": [base64.b64encode(b).decode("ascii") for b in blobs],
        "top_k": top_k,
        "prompt": prompt,
    }
    if version is not None:
        body["version"] = version
    return json.dumps(body).encode()


@dataclass
class LoadResult:
    """What a closed-loop HTTP load phase saw. ``statuses``: HTTP status → count (0 = no answer:
    ``client_timeouts`` + ``connection_errors``). ``latencies_s``: of 200 answers only."""

    concurrency: int
    wall_s: float
    images_per_request: int
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    error_latencies_s: list[float] = field(default_factory=list)
    retry_after: dict[int, int] = field(default_factory=dict)  # status → answers that carried Retry-After
    retry_after_values: list[float] = field(default_factory=list)
    client_timeouts: int = 0
    connection_errors: int = 0
    error_types: dict[str, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0
    # (seconds since ``t0`` when the answer came, status, latency seconds) when ``record_events``.
    events: list[tuple[float, int, float]] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def images_per_s(self) -> float:
        return self.ok * self.images_per_request / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "images_per_request": self.images_per_request,
            "wall_s": round(self.wall_s, 3),
            "requests": self.requests,
            "ok": self.ok,
            "requests_per_s": round(self.ok / self.wall_s, 3) if self.wall_s > 0 else None,
            "images_per_s": round(self.images_per_s, 3),
            "latency": summarize(self.latencies_s),
            "error_latency": summarize(self.error_latencies_s),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "retry_after": {str(k): v for k, v in sorted(self.retry_after.items())},
            "retry_after_max_s": max(self.retry_after_values) if self.retry_after_values else None,
            "client_timeouts": self.client_timeouts,
            "connection_errors": self.connection_errors,
            "error_types": dict(sorted(self.error_types.items())),
            "client_cpu_s": round(self.client_cpu_s, 3),
        }


async def http_load_async(
    url: str,
    body: bytes | Sequence[bytes],
    *,
    concurrency: int,
    seconds: float,
    images_per_request: int = 1,
    path: str = "/predict",
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
    reject_pause_s: float = 0.0,
    max_requests: int | None = None,
    min_requests_per_client: int = 0,
    record_events: bool = False,
    t0: float | None = None,
) -> LoadResult:
    """``concurrency`` clients each POST ``body`` (or the bodies in turn) back to back for ``seconds``.

    A client that gets 429/503 pauses ``reject_pause_s`` (0: none) before its next request, as a
    polite client would, instead of spinning on rejections. Requests started before the deadline are
    awaited and counted; ``wall_s`` runs to the last answer. Each client sends at least
    ``min_requests_per_client`` requests (``seconds=0, min_requests_per_client=1``: a warm-up), and all
    together at most ``max_requests``. ``record_events`` keeps every answer's (time since ``t0``
    (a ``time.perf_counter()`` value; default: the start), status, latency) for timelines.
    """
    import httpx

    bodies = [body] if isinstance(body, (bytes, bytearray)) else list(body)
    hdrs = {"content-type": "application/json", **(headers or {})}
    result = LoadResult(concurrency=concurrency, wall_s=0.0, images_per_request=images_per_request)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0))
    # Set when the client exists (building one takes tens of milliseconds: its SSL context).
    started = deadline = origin = 0.0
    counter = 0

    def note(status: int, latency: float) -> None:
        if record_events:
            result.events.append((time.perf_counter() - origin, status, latency))

    async def one_client(client: httpx.AsyncClient, index: int) -> None:
        nonlocal counter
        i = index
        sent = 0
        while (time.perf_counter() < deadline or sent < min_requests_per_client) and (
            max_requests is None or counter < max_requests
        ):
            counter += 1
            sent += 1
            payload = bodies[i % len(bodies)]
            i += concurrency
            t_req = time.perf_counter()
            try:
                resp = await client.post(url + path, content=payload, headers=hdrs)
            except httpx.TimeoutException:
                result.client_timeouts += 1
                result.statuses[0] = result.statuses.get(0, 0) + 1
                note(0, time.perf_counter() - t_req)
                continue
            except httpx.TransportError:
                result.connection_errors += 1
                result.statuses[0] = result.statuses.get(0, 0) + 1
                note(0, time.perf_counter() - t_req)
                await asyncio.sleep(0.05)
                continue
            elapsed = time.perf_counter() - t_req
            status = resp.status_code
            note(status, elapsed)
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status == 200:
                result.latencies_s.append(elapsed)
                continue
            result.error_latencies_s.append(elapsed)
            retry = resp.headers.get("retry-after")
            if retry is not None:
                result.retry_after[status] = result.retry_after.get(status, 0) + 1
                with contextlib.suppress(ValueError):
                    result.retry_after_values.append(float(retry))
            try:
                kind = str(resp.json()["error"]["type"])
            except Exception:
                kind = f"http_{status}"
            result.error_types[kind] = result.error_types.get(kind, 0) + 1
            if status in (429, 503) and reject_pause_s > 0:
                await asyncio.sleep(reject_pause_s)

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        started = time.perf_counter()
        origin = started if t0 is None else t0
        deadline = started + seconds
        cpu0 = time.process_time()
        await asyncio.gather(*(one_client(client, k) for k in range(concurrency)))
        result.wall_s = time.perf_counter() - started
        result.client_cpu_s = time.process_time() - cpu0
    return result


def http_load(url: str, body: bytes | Sequence[bytes], **kwargs: Any) -> LoadResult:
    """``http_load_async`` on a fresh event loop (see there for the arguments)."""
    return asyncio.run(http_load_async(url, body, **kwargs))
