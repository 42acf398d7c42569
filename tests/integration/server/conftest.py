"""Fixtures for the HTTP layer: a real registry in a temp home, and a fake engine implementing the
engine seam (fast, and able to be slow, full or broken on demand)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fmlora.errors import UnknownTaskError, VersionNotFoundError
from fmlora.registry.registry import Registry
from server.api.app import create_app
from server.api.settings import Settings
from server.core.errors import NotReadyError
from tests.conftest import tiny_config

ADMIN = "admin-key-0123456789abcdef"
API = "api-key-0123456789abcdef"


@dataclass
class FakeImageResult:
    predictions: list[dict[str, Any]]
    prompt: dict[str, Any]


@dataclass
class FakePrediction:
    model_version: int | None
    snapshot_sha256: str | None
    results: list[FakeImageResult]


@dataclass
class FakeEngine:
    """Implements the engine seam (server.core.engine.Engine) without a model."""

    registry: Registry | None = None
    labels: list[str] = field(default_factory=lambda: ["cat", "dog", "robin"])
    label_tasks: list[str] = field(default_factory=lambda: ["pets", "pets", "birds"])
    tasks: list[str] = field(default_factory=lambda: ["pets", "birds"])
    delay_s: float = 0.0
    start_delay_s: float = 0.0
    fail_start: bool = False
    raise_on_predict: BaseException | None = None
    device: str = "cpu"
    dtype: str = "float32"
    ready: bool = False
    serving_version: int | None = None
    started: bool = False
    stopped: bool = False
    stop_timeout: float | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    completed: int = 0
    batch_hooks: list[Callable[..., None]] = field(default_factory=list)
    swap_hooks: list[Callable[..., None]] = field(default_factory=list)

    @property
    def serving_sha256(self) -> str | None:
        return None if self.serving_version is None else f"{self.serving_version:064x}"

    def start(self) -> None:
        time.sleep(self.start_delay_s)
        if self.fail_start:
            raise RuntimeError("secret internal detail /etc/passwd")
        if self.registry is not None:
            self.serving_version = self.registry.live_version()
        self.started = True
        self.ready = True

    def stop(self, timeout_s: float = 30.0) -> None:
        self.stop_timeout = timeout_s
        self.ready = False
        self.stopped = True

    def reload(self) -> int | None:
        live = self.registry.live_version() if self.registry is not None else None
        for hook in self.swap_hooks:
            hook(True, 0.01, live)
        self.serving_version = live
        return live

    def on_batch(self, callback: Callable[..., None]) -> None:
        self.batch_hooks.append(callback)

    def on_swap(self, callback: Callable[..., None]) -> None:
        self.swap_hooks.append(callback)

    def stats(self) -> dict[str, Any]:
        return {"queue_depth": self.in_flight, "swaps_total": 3, "swaps_failed": 1, "batch_sizes": {}}

    async def predict(self, images: list[np.ndarray], top_k: int = 5, prompt: Any = "auto", version: Any = None):
        if not self.ready:
            raise NotReadyError("not started")
        self.calls.append(
            {
                "n": len(images),
                "shapes": [a.shape for a in images],
                "top_k": top_k,
                "prompt": prompt,
                "version": version,
            }
        )
        if self.raise_on_predict is not None:
            raise self.raise_on_predict
        if version is not None and version not in (1, 2, self.serving_version):
            raise VersionNotFoundError(f"version {version} does not exist")
        if isinstance(prompt, dict) and prompt.get("task") not in self.tasks:
            raise UnknownTaskError(f"unknown task {prompt.get('task')!r}; known tasks: {self.tasks}")
        self.in_flight += 1
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        for hook in self.batch_hooks:
            hook(len(images), 0.001)
        k = min(top_k, len(self.labels))
        results = []
        for img in images:
            best = int(img.mean()) % len(self.labels)
            order = [best, *[i for i in range(len(self.labels)) if i != best]][:k]
            preds = [
                {"label": self.labels[i], "score": 1.0 / (r + 2), "task": self.label_tasks[i]}
                for r, i in enumerate(order)
            ]
            mode = "task" if isinstance(prompt, dict) else prompt
            task = prompt["task"] if isinstance(prompt, dict) else (None if prompt == "none" else "pets")
            results.append(
                FakeImageResult(
                    preds, {"mode": mode, "task": task, "weights": None if prompt == "none" else {"pets": 1.0}}
                )
            )
        self.completed += 1
        return FakePrediction(version or self.serving_version, self.serving_sha256, results)


def png_bytes(size: tuple[int, int] = (8, 8), color: tuple[int, int, int] = (200, 10, 10), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def publish_fake_version(
    registry: Registry, tasks: list[str], card: dict[str, Any] | None = None, accepted: bool = True
) -> int:
    """Record a version whose snapshot directory exists (the fake engine never reads it)."""
    version = registry.next_version()
    directory = registry.snapshot_dir(version)
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text("{}")
    registry.record_version(
        version=version,
        parent=registry.live_version(),
        sha256=f"{version:064x}",
        tasks=tasks,
        card=card or {"accuracy": {t: 0.9 for t in tasks}, "final_accuracy": 0.9, "forgetting": 0.01},
        adapter_bytes=12345,
        task_id=None,
        accepted=accepted,
    )
    return version


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def registry(home: Path) -> Registry:
    return Registry.open(home, tiny_config())


def wait_ready(client: TestClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.01)
    raise AssertionError("the app did not become ready")


@pytest.fixture
def make_client(home: Path, registry: Registry) -> Iterator[Callable[..., Any]]:
    """make_client(engine=None, wait=True, **settings) -> TestClient inside its lifespan."""
    stack: list[Any] = []

    @contextmanager
    def _noop() -> Iterator[None]:
        yield

    def factory(engine: FakeEngine | None = None, wait: bool = True, **overrides: Any) -> TestClient:
        values: dict[str, Any] = {"home": home, "admin_key": ADMIN, "max_image_pixels": 1_000_000}
        values.update(overrides)
        engine = engine if engine is not None else FakeEngine(registry=registry)
        app = create_app(Settings(**values), engine=engine, registry=registry)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        stack.append(client)
        if wait:
            wait_ready(client)
        return client

    yield factory
    for client in reversed(stack):
        client.__exit__(None, None, None)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_envelope(response: Any, status: int, error_type: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"type", "message", "request_id"} <= set(error), error
    assert error["request_id"] == response.headers["x-request-id"]
    assert error["message"]
    if error_type is not None:
        assert error["type"] == error_type, error
    return error


def zip_task(classes: dict[str, int], size: int = 8) -> bytes:
    """A zip archive with one folder per class and ``n`` distinct small PNGs in each."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for c_index, (cls, n) in enumerate(classes.items()):
            for i in range(n):
                zf.writestr(f"{cls}/{i}.png", png_bytes((size, size), (10 * i % 256, 20 * c_index % 256, 7)))
    return buf.getvalue()


def json_dumps(value: Any) -> str:
    return json.dumps(value)
