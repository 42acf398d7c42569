"""Liveness, readiness, server information and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from fmlora._version import __version__
from server.api.auth import require_api_key
from server.api.errors import ApiError
from server.api.metrics import CONTENT_TYPE
from server.api.routes._common import get_state
from server.api.schemas import ErrorEnvelope, HealthResponse, InfoResponse, ReadyResponse

router = APIRouter(tags=["health"])

_UNAVAILABLE = {503: {"model": ErrorEnvelope, "description": "Not ready (Retry-After says when to ask again)."}}


@router.get("/healthz", response_model=HealthResponse, responses=_UNAVAILABLE, summary="Liveness")
async def healthz(request: Request) -> HealthResponse:
    """The process answers. 503 only when the engine failed to start (restart the process)."""
    state = get_state(request)
    if state.startup_error is not None:
        raise ApiError(503, "engine_failed", "the inference engine failed to start; see the server log")
    return HealthResponse()


@router.get("/readyz", response_model=ReadyResponse, responses=_UNAVAILABLE, summary="Readiness")
async def readyz(request: Request) -> ReadyResponse:
    """Ready once the model (a snapshot or the bare backbone) is loaded and warmed up; it stays ready
    while a new version is swapped in."""
    state = get_state(request)
    state.ensure_ready()
    return ReadyResponse(serving_version=state.engine.serving_version)


@router.get("/info", response_model=InfoResponse, dependencies=[Depends(require_api_key)], summary="Server info")
def info(request: Request) -> InfoResponse:
    """Library version, backbone, device, what this replica serves, and the request limits."""
    state = get_state(request)
    engine = state.engine
    settings = state.settings
    ready = state.is_ready()
    return InfoResponse(
        version=__version__,
        backbone=state.backbone_name(),
        device=state.device_name(),
        dtype=state.dtype_name(),
        backend=settings.backend,
        ready=ready,
        serving_version=engine.serving_version if ready else None,
        serving_sha256=engine.serving_sha256 if ready else None,
        live_version=state.registry.live_version() if state.registry is not None else None,
        labels=len(engine.labels) if ready else 0,
        tasks=list(state.task_names()) if ready else [],
        limits={
            "max_images_per_request": settings.max_images_per_request,
            "max_body_bytes": settings.max_body_bytes,
            "max_image_pixels": settings.max_image_pixels,
            "max_archive_bytes": settings.max_archive_bytes,
            "max_batch_size": settings.max_batch_size,
            "max_queue": settings.max_queue,
            "request_timeout_s": settings.request_timeout_s,
            "max_top_k": 1000,
        },
        auth=settings.auth_summary,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {}}, "description": "Prometheus text format."}},
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    state = get_state(request)
    body = await run_in_threadpool(state.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)
