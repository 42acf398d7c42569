"""Fixtures for the HTTP layer: a real registry in a temp home, and a fake engine implementing the
engine seam (fast, and able to be slow, full or broken on demand)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from fmlora.errors import UnknownTaskError, VersionNotFoundError
from fmlora.model import FMLoRAModel
from fmlora.model.prompts import PromptChoice
from fmlora.registry.publish import publish_version
from fmlora.registry.registry import Registry
from server.api.app import create_app
from server.api.settings import Settings
from server.core.errors import NoModelError, NotReadyError
from server.core.protocol import BatchCallback, EngineInfo, EngineStats, PromptInput, StagesCallback, SwapCallback
from server.core.results import ImageResult, LabelScore, Prediction, PromptUsed
from tests.conftest import tiny_config
from tests.helpers import learn_quickly

ADMIN = "admin-key-0123456789abcdef"
API = "api-key-0123456789abcdef"


@dataclass(frozen=True)
class FakeServed:
    version: int
    sha256: str
    labels: tuple[str, ...]
    task_names: tuple[str, ...]


@dataclass
class FakeEngine:
    """Implements the engine seam (``server.core.protocol.ServingEngine``) without a model. It serves
    what the registry's live version names when it starts or reloads, with these labels."""

    registry: Registry | None = None
    labels: tuple[str, ...] = ("cat", "dog", "robin")
    label_tasks: tuple[str, ...] = ("pets", "pets", "birds")
    delay_s: float = 0.0
    start_delay_s: float = 0.0
    fail_start: bool = False
    raise_on_predict: BaseException | None = None
    info: dict[str, str] = field(default_factory=lambda: {"backend": "torch", "device": "cpu", "dtype": "float32"})
    ready: bool = False
    serving: FakeServed | None = None
    started: bool = False
    stopped: bool = False
    stop_timeout: float | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    completed: int = 0
    batch_hooks: list[BatchCallback] = field(default_factory=list)
    swap_hooks: list[SwapCallback] = field(default_factory=list)

    @property
    def serving_version(self) -> int | None:
        return None if self.serving is None else self.serving.version

    def _follow_registry(self) -> None:
        live = self.registry.live_version() if self.registry is not None else None
        if live is None or self.registry is None:
            self.serving = None
            return
        tasks = tuple(self.registry.get_version(live).tasks)
        self.serving = FakeServed(live, f"{live:064x}", self.labels, tasks)

    def start(self) -> None:
        time.sleep(self.start_delay_s)
        if self.fail_start:
            raise RuntimeError("secret internal detail /etc/passwd")
        self._follow_registry()
        self.started = True
        self.ready = True

    def stop(self, timeout_s: float = 30.0) -> bool:
        self.stop_timeout = timeout_s
        self.ready = False
        self.stopped = True
        return True

    def reload(self) -> int | None:
        self._follow_registry()
        for hook in self.swap_hooks:
            hook(True, 0.01, self.serving_version)
        return self.serving_version

    def on_batch(self, callback: BatchCallback) -> None:
        self.batch_hooks.append(callback)

    def on_swap(self, callback: SwapCallback) -> None:
        self.swap_hooks.append(callback)

    def on_swap_stages(self, callback: StagesCallback) -> None:
        pass

    def describe(self) -> EngineInfo:
        return EngineInfo(
            backend=self.info["backend"],
            device=self.info["device"],
            dtype=self.info["dtype"],
            backbone="fake",
            input_size=[32, 32],
            crop_pct=1.0,
            merged_adapters=True,
            max_batch_size=8,
            max_wait_ms=0.0,
            max_queue=64,
            request_timeout_s=30.0,
            cached_versions=4,
        )

    def stats(self) -> EngineStats:
        counters = dict.fromkeys(
            ("queue_requests", "batches_total", "items_total", "requests_total", "rejected_total", "timeouts_total"),
            0,
        )
        return EngineStats(
            ready=self.ready,
            serving_version=self.serving_version,
            swaps_total=3,
            swaps_failed=1,
            last_swap_seconds=0.01,
            queue_depth=self.in_flight,
            errors_total=0,
            last_batch_size=0,
            last_batch_seconds=0.0,
            mean_batch_size=0.0,
            throughput_items_per_s=0.0,
            adapter_switches_total=0,
            last_adapter_switch_seconds=None,
            registry_polls_total=0,
            registry_poll_errors_total=0,
            registry_live_version=None,
            versions=None,
            **counters,  # type: ignore[typeddict-item]
        )

    async def predict(
        self,
        images: Sequence[np.ndarray],
        top_k: int = 5,
        prompt: PromptInput = "auto",
        version: int | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Prediction:
        if not self.ready:
            raise NotReadyError("not started")
        choice = PromptChoice.parse(prompt)
        self.calls.append(
            {
                "n": len(images),
                "shapes": [a.shape for a in images],
                "top_k": top_k,
                "prompt": choice,
                "version": version,
            }
        )
        if self.raise_on_predict is not None:
            raise self.raise_on_predict
        if self.serving is None:
            raise NoModelError("no model version is live yet")
        if version is not None and version not in (1, 2, self.serving.version):
            raise VersionNotFoundError(f"version {version} does not exist")
        if choice.mode == "task" and choice.task not in self.serving.task_names:
            raise UnknownTaskError(f"unknown task {choice.task!r}; known tasks: {self.serving.task_names}")
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
                LabelScore(label=self.labels[i], score=1.0 / (r + 2), task=self.label_tasks[i])
                for r, i in enumerate(order)
            ]
            task = choice.task if choice.mode == "task" else None if choice.mode == "none" else "pets"
            weights = {} if choice.mode == "none" else {"pets": 1.0}
            results.append(ImageResult(preds, PromptUsed(mode=choice.mode, task=task, weights=weights)))
        self.completed += 1
        served = self.serving.version if version is None else version
        return Prediction(served, f"{served:064x}", results)


def png_bytes(size: tuple[int, int] = (8, 8), color: tuple[int, int, int] = (200, 10, 10), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def publish_fake_version(
    registry: Registry, tasks: list[str], card: dict[str, Any] | None = None, accepted: bool = True
) -> int:
    """Publish a version with ``tasks`` through ``publish_version`` (the worker's path, any store):
    a tiny model whose tasks stand in for learned ones (the fake engine never reads the snapshot)."""
    torch.manual_seed(0)
    model = FMLoRAModel(registry.model_config)
    for seed, task in enumerate(tasks):
        learn_quickly(model, task, [f"{task}-a", f"{task}-b"], seed=seed)
    info = publish_version(
        registry,
        model,
        card=card or {"accuracy": {t: 0.9 for t in tasks}, "final_accuracy": 0.9, "forgetting": 0.01},
        parent=registry.live_version(),
        accepted=accepted,
    )
    return info.version


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
