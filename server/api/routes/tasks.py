"""Task uploads (admin) and task status."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from fmlora.registry.intake import IntakeLimits, submit
from server.api.auth import require_admin, require_api_key
from server.api.errors import ApiError
from server.api.routes._common import get_state, media_type, parse_multipart
from server.api.schemas import ErrorEnvelope, TaskAccepted, TaskList, TaskOut, TaskStatus

log = logging.getLogger("fmlora.server")

router = APIRouter(tags=["tasks"])

IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,200}$"

_AUTH = {
    401: {"model": ErrorEnvelope, "description": "Missing or malformed Authorization header, or an unknown key."},
    403: {"model": ErrorEnvelope, "description": "A valid key without this right, or management is off."},
}


class TaskForm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    kind: Literal["class", "domain"] = "class"


_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["archive", "name"],
                    "properties": {
                        "archive": {
                            "type": "string",
                            "format": "binary",
                            "description": "zip or tar (optionally gzip/bz2/xz): one folder per class, images inside.",
                        },
                        "name": {"type": "string", "minLength": 1, "maxLength": 100, "description": "Task name."},
                        "kind": {
                            "type": "string",
                            "enum": ["class", "domain"],
                            "default": "class",
                            "description": "'class': new classes; 'domain': known classes in a new domain.",
                        },
                    },
                }
            }
        },
    }
}


def _accepted(task: TaskOut | object, status_code: int, replayed: bool) -> JSONResponse:
    body = TaskAccepted(id=task.id, status=task.status, url=f"/tasks/{task.id}")  # type: ignore[attr-defined]
    headers = {"Location": body.url}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


@router.post(
    "/tasks",
    status_code=202,
    response_model=TaskAccepted,
    dependencies=[Depends(require_admin)],
    openapi_extra=_UPLOAD_SCHEMA,
    responses={
        200: {
            "model": TaskAccepted,
            "description": "Replay: this Idempotency-Key was used before with the same name and kind; the body "
            "describes the task stored then (its current status), and Idempotent-Replayed: true is set.",
        },
        202: {"description": "Stored and queued; follow the Location header."},
        **_AUTH,
        400: {"model": ErrorEnvelope, "description": "Malformed multipart body."},
        409: {"model": ErrorEnvelope, "description": "Name taken, or the Idempotency-Key was used for another task."},
        413: {"model": ErrorEnvelope, "description": "The archive exceeds a size or file-count limit."},
        415: {"model": ErrorEnvelope, "description": "Not multipart, or the archive is not a zip or tar."},
        422: {"model": ErrorEnvelope, "description": "Bad fields, unsafe archive, undecodable images, bad classes."},
    },
)
async def create_task(
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            pattern=IDEMPOTENCY_KEY_PATTERN,
            description="Makes retries safe: the same key (with the same name and kind) returns the task "
            "stored the first time instead of a second one.",
        ),
    ] = None,
) -> JSONResponse:
    """Upload a task (admin): the archive is streamed to a temporary file under the size limit,
    validated completely (safety, sizes, every image decodes, class layout), then stored and queued."""
    state = get_state(request)
    registry = state.require_registry()
    settings = state.settings
    if media_type(request) != "multipart/form-data":
        raise ApiError(
            415, "unsupported_media_type", "POST /tasks takes multipart/form-data (fields archive, name, kind)"
        )
    form = await parse_multipart(request, max_files=1, max_fields=4, what="files")
    try:
        archive = form.get("archive")
        if not isinstance(archive, UploadFile):
            raise ApiError(422, "validation_error", "the multipart field 'archive' (a file) is required")
        fields = {k: v for k, v in form.multi_items() if k != "archive"}
        if any(not isinstance(v, str) for v in fields.values()):
            raise ApiError(422, "validation_error", "only 'archive' may be a file")
        try:
            parsed = TaskForm.model_validate(fields)
        except ValidationError as exc:
            from fastapi.exceptions import RequestValidationError

            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
        if archive.size is not None and archive.size > settings.max_archive_bytes:
            raise ApiError(
                413, "archive_too_large", f"the archive is larger than the limit of {settings.max_archive_bytes} bytes"
            )
        limits = IntakeLimits(
            max_archive_bytes=settings.max_archive_bytes,
            max_files=settings.max_archive_files,
            max_unpacked_bytes=settings.max_unpacked_bytes,
            max_image_pixels=settings.max_image_pixels,
        )
        await archive.seek(0)
        submission = await run_in_threadpool(
            submit,
            registry,
            archive.file,
            name=parsed.name,
            kind=parsed.kind,
            idempotency_key=idempotency_key,
            limits=limits,
        )
    finally:
        await form.close()
    task, replayed = submission.task, submission.replayed
    if not replayed:
        state.metrics.tasks_submitted.inc()
        log.info("task %s (%s) queued as %s", task.name, task.kind, task.id)
    return _accepted(task, 200 if replayed else 202, replayed)


@router.get("/tasks", response_model=TaskList, dependencies=[Depends(require_api_key)], responses=_AUTH)
def list_tasks(
    request: Request,
    limit: int = Query(100, ge=1, le=1000, description="At most this many, newest first."),
    status: TaskStatus | None = Query(None, description="Only tasks in this status."),
) -> TaskList:
    registry = get_state(request).require_registry()
    tasks = registry.list_tasks(limit=limit, status=status)
    return TaskList(tasks=[TaskOut.model_validate(t.model_dump()) for t in tasks])


@router.get(
    "/tasks/{task_id}",
    response_model=TaskOut,
    dependencies=[Depends(require_api_key)],
    responses={**_AUTH, 404: {"model": ErrorEnvelope, "description": "No such task."}},
)
def get_task(request: Request, task_id: str = Path(max_length=200)) -> TaskOut:
    registry = get_state(request).require_registry()
    return TaskOut.model_validate(registry.get_task(task_id).model_dump())
