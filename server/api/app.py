"""The FastAPI application factory.

``create_app(settings)`` builds the app; its lifespan opens the registry, builds the engine and starts
it in the background (so ``/healthz`` answers at once and ``/readyz`` turns 200 once the model is
loaded and warmed up), and on shutdown stops the engine after uvicorn has let in-flight requests
finish (``shutdown_timeout_s``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fmlora._version import __version__
from fmlora.model.config import BackboneConfig, ModelConfig, override_backbone
from fmlora.registry.registry import Registry
from fmlora.registry.store import S3Options
from server.api.console import install_console
from server.api.errors import ApiError, RequestContextMiddleware, error_response, install_error_handlers, request_id_of
from server.api.metrics import ServerMetrics
from server.api.routes import health, models, predict, tasks, whoami
from server.api.routes._common import COMMON_RESPONSES
from server.api.settings import Settings
from server.api.state import ServerState
from server.core.engine import Engine, EngineConfig
from server.core.protocol import ServingEngine

__all__ = [
    "BodyLimitMiddleware",
    "ServerState",
    "build_engine",
    "create_app",
    "model_config_for",
    "open_registry",
    "s3_options_for",
]

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


def s3_options_for(settings: Settings) -> S3Options:
    """S3 options from settings; credentials stay with boto3's standard sources (AWS_* variables, profiles)."""
    return S3Options(
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        addressing_style=settings.s3_addressing_style,
    )


def open_registry(settings: Settings) -> Registry:
    """The registry the settings name; a malformed URL or refused credentials raise RegistryConfigError /
    StoreConfigError naming FMLORA_REGISTRY_URL or FMLORA_STORE_URL."""
    return Registry.open(
        settings.home,
        model_config_for(settings),
        registry_url=settings.registry_url_value,
        store_url=settings.store_url,
        s3=s3_options_for(settings),
    )


# Settings that configure the engine, under the same names in EngineConfig.
ENGINE_SETTINGS = (
    "device",
    "dtype",
    "backend",
    "max_batch_size",
    "max_wait_ms",
    "max_queue",
    "request_timeout_s",
    "cached_versions",
    "poll_interval_s",
    "follow_registry",
)


def build_engine(settings: Settings, registry: Registry) -> Engine:
    """The torch (or ONNX) engine configured from settings."""
    fields = {name: getattr(settings, name) for name in ENGINE_SETTINGS}
    return Engine(registry, EngineConfig(**fields, notify=settings.registry_notify))


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.fmlora
    settings = state.settings
    if state.registry is None:
        state.registry = await run_in_threadpool(open_registry, settings)
    engine = state.engine = state.engine or build_engine(settings, state.registry)
    engine.on_batch(state.metrics.on_batch)
    engine.on_swap(state.metrics.on_swap)
    engine.on_swap_stages(state.metrics.on_swap_stages)

    async def start() -> None:
        try:
            await run_in_threadpool(engine.start)
        except Exception as exc:
            state.startup_error = type(exc).__name__
            log.error("the inference engine failed to start", exc_info=exc)
            return
        if state.freeze_gc_at_start:
            # A full collection walks every object: ~0.4 s in a server process with the model loaded,
            # every thread stopped meanwhile. Objects alive now (modules, the model) live as long as the
            # process, so later collections need not walk them.
            await run_in_threadpool(_freeze_gc)
        state.started = True
        info = engine.describe()
        log.info("ready: serving version %s on %s (%s)", engine.serving_version, info["device"], info["dtype"])

    state.start_task = asyncio.create_task(start(), name="fmlora-engine-start")
    try:
        yield
    finally:
        # uvicorn has stopped accepting and waited for in-flight requests (up to its graceful timeout).
        state.stopping = True
        if state.start_task is not None and not state.start_task.done():
            await asyncio.shield(state.start_task)
        log.info("shutting down: stopping the engine")
        await run_in_threadpool(engine.stop, settings.shutdown_timeout_s)
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


def _freeze_gc() -> None:
    gc.collect()
    gc.freeze()


def create_app(
    settings: Settings | None = None,
    *,
    engine: ServingEngine | None = None,
    registry: Registry | None = None,
    freeze_gc_at_start: bool = False,
) -> FastAPI:
    """Build the app. ``engine`` and ``registry`` are for embedding and tests; by default the lifespan
    opens the registry at ``settings.home`` and builds the engine from settings. The app starts and
    stops whatever engine it is given. ``freeze_gc_at_start``: once the engine is ready, move every
    object alive to the garbage collector's permanent generation (``gc.freeze``), for a process that
    runs this one app (``fmlora serve``)."""
    settings = settings or Settings()
    metrics = ServerMetrics()
    state = ServerState(
        settings=settings, metrics=metrics, registry=registry, engine=engine, freeze_gc_at_start=freeze_gc_at_start
    )
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
