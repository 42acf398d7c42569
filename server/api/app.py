"""The FastAPI application factory.

``create_app(settings)`` builds the app; its lifespan opens the registry, builds the engine and starts
it in the background (so ``/healthz`` answers at once and ``/readyz`` turns 200 once the model is
loaded and warmed up), and on shutdown stops the engine after uvicorn has let in-flight requests
finish (``shutdown_timeout_s``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fmlora._version import __version__
from fmlora.model.config import BackboneConfig, ModelConfig, override_backbone
from fmlora.registry.registry import Registry, VersionInfo
from server.api.console import install_console
from server.api.errors import ApiError, RequestContextMiddleware, error_response, install_error_handlers, request_id_of
from server.api.metrics import ServerMetrics
from server.api.routes import health, models, predict, tasks, whoami
from server.api.settings import Settings
from server.core.errors import NotReadyError

from .routes._common import COMMON_RESPONSES

__all__ = ["BodyLimitMiddleware", "ServerState", "create_app", "model_config_for", "open_registry"]

log = logging.getLogger("fmlora.server")

# Room for the multipart envelope and text fields around an uploaded archive.
UPLOAD_OVERHEAD_BYTES = 1 << 20

DESCRIPTION = """\
Classification with a continually learning ViT: upload a task (a folder per class), a worker learns
it with FM-LoRA, and the new version is hot-swapped in without dropping a request.

Every error is `{"error": {"type", "message", "request_id"}}`; every response carries `X-Request-ID`.
Keys go in `Authorization: Bearer <key>`: the admin key for `POST /tasks` and activation, the API key
(when the server sets one) for everything else except health and metrics.
"""


@dataclass
class ServerState:
    """Everything the routes need, on ``app.state.fmlora``."""

    settings: Settings
    metrics: ServerMetrics
    registry: Registry | None = None
    engine: Any = None
    started: bool = False
    stopping: bool = False
    startup_error: str | None = None
    start_task: asyncio.Task[None] | None = None
    _versions: OrderedDict[int, VersionInfo] = field(default_factory=OrderedDict)
    _versions_lock: threading.Lock = field(default_factory=threading.Lock)

    # -- readiness ---------------------------------------------------------------------------
    def is_ready(self) -> bool:
        return self.started and not self.stopping and self.engine is not None and bool(self.engine.ready)

    def ensure_ready(self) -> None:
        if self.is_ready():
            return
        if self.startup_error is not None:
            raise NotReadyError("the inference engine failed to start; see the server log", retry_after=30)
        if self.stopping:
            raise NotReadyError("the server is shutting down")
        raise NotReadyError("the model is still loading; retry shortly")

    def require_registry(self) -> Registry:
        if self.registry is None:
            raise NotReadyError("the registry is not open yet")
        return self.registry

    # -- descriptions ------------------------------------------------------------------------
    def backbone_name(self) -> str:
        if self.registry is not None:
            return self.registry.model_config.backbone.name
        return ""

    def _describe(self) -> dict[str, Any]:
        describe = getattr(self.engine, "describe", None)
        if not callable(describe):
            return {"device": getattr(self.engine, "device", None), "dtype": getattr(self.engine, "dtype", None)}
        try:
            return dict(describe())
        except Exception:
            return {}

    def device_name(self) -> str:
        value = self._describe().get("device")
        return str(value) if value else self.settings.device

    def dtype_name(self) -> str:
        value = self._describe().get("dtype")
        return str(value).removeprefix("torch.") if value else self.settings.dtype

    def task_names(self) -> list[str]:
        names = []
        for t in getattr(self.engine, "tasks", None) or []:
            names.append(t if isinstance(t, str) else getattr(t, "name", str(t)))
        return names

    def version_info(self, version: int | None) -> VersionInfo | None:
        """Cached registry lookup: a version's card and size never change once published."""
        if version is None or self.registry is None:
            return None
        with self._versions_lock:
            info = self._versions.get(version)
        if info is None:
            try:
                info = self.registry.get_version(version)
            except Exception:
                return None
            with self._versions_lock:
                self._versions[version] = info
                while len(self._versions) > 32:
                    self._versions.popitem(last=False)
        return info

    def metrics_state(self) -> dict[str, Any]:
        """What /metrics reports at scrape time (called in a worker thread)."""
        engine = self.engine
        ready = self.is_ready()
        live = self.registry.live_version() if self.registry is not None else None
        serving = engine.serving_version if ready else None
        stats = {}
        if engine is not None and self.started:
            stats = dict(engine.stats() or {})
        serving_info = self.version_info(serving)
        live_info = self.version_info(live)
        return {
            "ready": ready,
            "backbone": self.backbone_name(),
            "device": self.device_name(),
            "dtype": self.dtype_name(),
            "backend": self.settings.backend,
            "stats": stats,
            "live_version": live,
            "serving_version": serving,
            "adapter_bytes": serving_info.adapter_bytes if serving_info is not None else 0,
            "live_card": live_info.card if live_info is not None else {},
        }


class BodyLimitMiddleware:
    """Refuse bodies over the limit while they stream in: a declared Content-Length over the limit is
    answered 413 before anything is read; otherwise bytes are counted as they arrive and the read
    fails with 413 at the first byte past the limit (nothing unbounded is held in memory)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = None
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                declared = value
                break
        if declared is not None:
            if not declared.strip().isdigit():
                response = error_response(request_id_of(scope), 400, "bad_request", "invalid Content-Length header")
                await response(scope, receive, send)
                return
            if int(declared) > limit:
                response = error_response(
                    request_id_of(scope), 413, "payload_too_large", f"the request body exceeds {limit} bytes"
                )
                await response(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise ApiError(413, "payload_too_large", f"the request body exceeds {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


def model_config_for(settings: Settings) -> ModelConfig | None:
    """The ModelConfig to create a NEW home with (an existing home keeps its own; a different one
    given here is refused by Registry.open). None: the default (the offline glyph ViT)."""
    if settings.model_config_file is not None:
        return ModelConfig.model_validate_json(settings.model_config_file.read_bytes())
    if settings.backbone is None:
        return None
    backbone = override_backbone(BackboneConfig(name=settings.backbone), None, settings.backbone_weights or None)
    return ModelConfig(backbone=backbone)


def open_registry(settings: Settings) -> Registry:
    return Registry.open(settings.home, model_config_for(settings))


def build_engine(settings: Settings, registry: Registry) -> Any:
    """The torch (or ONNX) engine configured from settings."""
    from server.core.engine import Engine, EngineConfig

    config = EngineConfig(
        device=settings.device,
        dtype=settings.dtype,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        request_timeout_s=settings.request_timeout_s,
        cached_versions=settings.cached_versions,
        poll_interval_s=settings.poll_interval_s,
        backend=settings.backend,
    )
    return Engine(registry, config)


def _subscribe(engine: Any, metrics: ServerMetrics) -> None:
    for hook, callback in (("on_batch", metrics.on_batch), ("on_swap", metrics.on_swap)):
        register = getattr(engine, hook, None)
        if callable(register):
            register(callback)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.fmlora
    settings = state.settings
    if state.registry is None:
        state.registry = await run_in_threadpool(open_registry, settings)
    if state.engine is None:
        state.engine = build_engine(settings, state.registry)
    _subscribe(state.engine, state.metrics)

    async def start() -> None:
        try:
            await run_in_threadpool(state.engine.start)
        except Exception as exc:
            state.startup_error = type(exc).__name__
            log.error("the inference engine failed to start", exc_info=exc)
            return
        state.started = True
        log.info(
            "ready: serving version %s on %s (%s)",
            state.engine.serving_version,
            state.device_name(),
            state.dtype_name(),
        )

    state.start_task = asyncio.create_task(start(), name="fmlora-engine-start")
    try:
        yield
    finally:
        # uvicorn has stopped accepting and waited for in-flight requests (up to its graceful timeout).
        state.stopping = True
        if state.start_task is not None and not state.start_task.done():
            await asyncio.shield(state.start_task)
        log.info("shutting down: stopping the engine")
        await run_in_threadpool(state.engine.stop, settings.shutdown_timeout_s)
        log.info("engine stopped")


def _document_manual_bodies(app: FastAPI) -> None:
    """Routes that parse their own bodies (to authenticate before reading them) reference schemas
    FastAPI cannot see; add those to the OpenAPI components."""
    from fastapi.openapi.utils import get_openapi

    from server.api.schemas import PredictRequest

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            extra = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(extra.pop("$defs", {}))
            components["PredictRequest"] = extra
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None, *, engine: Any = None, registry: Registry | None = None) -> FastAPI:
    """Build the app. ``engine`` and ``registry`` are for embedding and tests; by default the lifespan
    opens the registry at ``settings.home`` and builds the engine from settings. The app starts and
    stops whatever engine it is given."""
    settings = settings or Settings()
    metrics = ServerMetrics()
    state = ServerState(settings=settings, metrics=metrics, registry=registry, engine=engine)
    metrics.watch(state.metrics_state)
    if not settings.auth_disabled and settings.admin_key is None:
        log.warning("no admin key configured: POST /tasks and activation answer 403 (set FMLORA_ADMIN_KEY)")
    if settings.auth_disabled:
        log.warning("authentication is disabled (FMLORA_AUTH_DISABLED): use this only on a trusted machine")

    app = FastAPI(
        title="fmlora",
        version=__version__,
        description=DESCRIPTION,
        lifespan=_lifespan,
        docs_url=None,  # served from local files by install_console (no CDN)
        redoc_url=None,
    )
    app.state.fmlora = state
    _document_manual_bodies(app)
    install_error_handlers(app)
    for module in (predict, tasks, models, health, whoami):
        app.include_router(module.router, responses=COMMON_RESPONSES)

    upload_limit = settings.max_archive_bytes + UPLOAD_OVERHEAD_BYTES

    def limit_for(scope: Scope) -> int:
        if scope.get("method") == "POST" and scope.get("path") == "/tasks":
            return upload_limit
        return settings.max_body_bytes

    # add_middleware wraps: the last added is the outermost.
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After", "Location"],
        )
    app.add_middleware(RequestContextMiddleware, observe=metrics)
    install_console(app)  # /console, offline /docs and /redoc, security headers (outermost)
    return app
