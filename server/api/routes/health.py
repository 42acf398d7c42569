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
    while a new version is swapped in, and while the registry database is unreachable: the replica
    keeps serving the version it holds, so ``degraded`` names the dependency and the status stays 200
    (an orchestrator must not take every replica out at once for an outage none of them can fix)."""
    state = get_state(request)
    engine = state.ensure_ready()
    dependencies = state.dependencies()
    degraded = sorted(name for name, status in dependencies.items() if status == "unreachable")
    return ReadyResponse(serving_version=engine.serving_version, dependencies=dependencies, degraded=degraded)


@router.get("/info", response_model=InfoResponse, dependencies=[Depends(require_api_key)], summary="Server info")
def info(request: Request) -> InfoResponse:
    """Library version, backbone, device, what this replica serves, and the request limits."""
    state = get_state(request)
    settings = state.settings
    serving = state.serving()
    info = state.engine.describe() if state.engine is not None else None
    return InfoResponse(
        version=__version__,
        backbone=state.backbone_name(),
        device=settings.device if info is None else info["device"],
        dtype=settings.dtype if info is None else info["dtype"],
        backend=settings.backend if info is None else info["backend"],
        ready=state.is_ready(),
        serving_version=None if serving is None else serving.version,
        serving_sha256=None if serving is None else serving.sha256,
        live_version=state.live_version(),
        training_worker=state.training_worker(),
        labels=0 if serving is None else len(serving.labels),
        tasks=[] if serving is None else list(serving.task_names),
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
