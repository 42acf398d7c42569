"""Published versions, the live pointer, and activation (rollback / roll forward)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Path, Request
from starlette.concurrency import run_in_threadpool

from server.api.auth import require_admin, require_api_key
from server.api.routes._common import get_state
from server.api.schemas import ActivateResponse, ErrorEnvelope, ModelsResponse, VersionOut

log = logging.getLogger("fmlora.server")

router = APIRouter(tags=["models"])

_AUTH = {
    401: {"model": ErrorEnvelope, "description": "Missing or malformed Authorization header, or an unknown key."},
    403: {"model": ErrorEnvelope, "description": "A valid key without this right, or management is off."},
}


@router.get("/models", response_model=ModelsResponse, dependencies=[Depends(require_api_key)], responses=_AUTH)
def list_models(request: Request) -> ModelsResponse:
    """Every published version with its evaluation card, which one is live, which this replica serves."""
    state = get_state(request)
    registry = state.require_registry()
    versions = registry.list_versions()
    serving = state.serving()
    return ModelsResponse(
        live=registry.live_version(),
        serving=None if serving is None else serving.version,
        versions=[VersionOut.model_validate(v.model_dump()) for v in versions],
    )


@router.get(
    "/models/{version}",
    response_model=VersionOut,
    dependencies=[Depends(require_api_key)],
    responses={**_AUTH, 404: {"model": ErrorEnvelope, "description": "No such version."}},
)
def get_model(request: Request, version: int = Path(ge=1)) -> VersionOut:
    """One version with its evaluation card."""
    registry = get_state(request).require_registry()
    return VersionOut.model_validate(registry.get_version(version).model_dump())


@router.post(
    "/models/{version}/activate",
    response_model=ActivateResponse,
    dependencies=[Depends(require_admin)],
    responses={
        **_AUTH,
        404: {"model": ErrorEnvelope, "description": "No such version."},
        409: {"model": ErrorEnvelope, "description": "The version was rejected or its files are missing."},
    },
)
async def activate(request: Request, version: int = Path(ge=1)) -> ActivateResponse:
    """Make a published version live (admin). This replica reloads at once, so the reply says what it
    serves; other replicas follow within their poll interval."""
    state = get_state(request)
    registry = state.require_registry()
    info = await run_in_threadpool(registry.activate, version)
    log.info("version %d activated through the API [request_id=%s]", version, request.scope.get("fmlora.request_id"))
    serving = None
    warning = None
    if state.is_ready():
        engine = state.ensure_ready()
        try:
            await run_in_threadpool(engine.reload)
        except Exception:
            log.exception("reload after activating version %d failed", version)
        serving = engine.serving_version
        if serving != info.version:
            warning = (
                f"version {info.version} is live in the registry, but this replica still serves {serving}: "
                "its snapshot could not be loaded (see the server log and fmlora_swaps_failed_total)"
            )
    else:
        warning = "this replica is not ready yet; it will serve the live version once it is"
    return ActivateResponse(
        live=info.version, serving=serving, version=VersionOut.model_validate(info.model_dump()), warning=warning
    )
