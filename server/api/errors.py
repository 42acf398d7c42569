"""One JSON error envelope for every failure, request ids, and the typed-error → HTTP mapping.

Every error response is ``{"error": {"type": "<snake_case>", "message": "...", "request_id": "..."}}``
and every response carries ``X-Request-ID``. A 500 never carries exception text: the exception is
logged with the request id, and the client gets a fixed message quoting that id.
"""

from __future__ import annotations

import asyncio
import http
import logging
import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fmlora.errors import (
    ArchiveFormatError,
    ArchiveTooLargeError,
    ClassLayoutError,
    DataError,
    FmloraError,
    IntakeError,
    InvalidImageError,
    PromptError,
    RegistryUnavailableError,
    StoreUnavailableError,
    TaskConflictError,
    TaskError,
    TaskNotFoundError,
    UnknownTaskError,
    UnsafeArchiveError,
    VersionNotFoundError,
    VersionStateError,
)
from server.core.errors import EngineError

__all__ = [
    "INTERNAL_ERROR_MESSAGE",
    "REQUEST_ID_HEADER",
    "ROUTE_ERRORS",
    "ApiError",
    "RequestContextMiddleware",
    "error_response",
    "install_error_handlers",
    "request_id_of",
]

logger = logging.getLogger("fmlora.server")

REQUEST_ID_HEADER = "X-Request-ID"
INTERNAL_ERROR_MESSAGE = "internal server error; the server logged the details under this request id"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
_SCOPE_KEY = "fmlora.request_id"

# Library errors: the most specific class listed first wins (the MRO is walked in order).
LIBRARY_ERRORS: Mapping[type[BaseException], tuple[int, str]] = {
    RegistryUnavailableError: (503, "registry_unavailable"),
    StoreUnavailableError: (503, "store_unavailable"),
    TaskNotFoundError: (404, "task_not_found"),
    VersionNotFoundError: (404, "version_not_found"),
    VersionStateError: (409, "version_state"),
    TaskConflictError: (409, "task_conflict"),
    ArchiveTooLargeError: (413, "archive_too_large"),
    ArchiveFormatError: (415, "unsupported_archive"),
    UnsafeArchiveError: (422, "unsafe_archive"),
    InvalidImageError: (422, "invalid_archive_image"),
    ClassLayoutError: (422, "invalid_class_layout"),
    IntakeError: (422, "invalid_task"),
    UnknownTaskError: (422, "unknown_task"),
    PromptError: (422, "invalid_prompt"),
    TaskError: (422, "invalid_task"),
    DataError: (400, "invalid_image"),
}

# A dependency that is down (the database, the object store): the caller retries; the server logs the cause.
UNAVAILABLE_RETRY_AFTER_S = 5
_UNAVAILABLE_MESSAGES = {
    "registry_unavailable": "the registry database is unreachable; retry later (predictions keep being served)",
    "store_unavailable": "the artifact store is unreachable; retry later (predictions keep being served)",
}

_STATUS_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout",
}


# Every type the routes, auth and middleware raise as ApiError, with its status: the one list the
# SDK contract test checks (each maps to the client exception of its status family).
ROUTE_ERRORS: Mapping[str, int] = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "admin_disabled": 403,
    "payload_too_large": 413,
    "too_many_images": 413,
    "too_many_files": 413,
    "archive_too_large": 413,
    "unsupported_media_type": 415,
    "validation_error": 422,
    "engine_failed": 503,
}


class ApiError(StarletteHTTPException):
    """An HTTP error with a machine-readable type from ``ROUTE_ERRORS``; raise it anywhere in a request."""

    def __init__(
        self,
        status_code: int,
        error_type: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        if ROUTE_ERRORS.get(error_type) != status_code:
            raise ValueError(f"ApiError type {error_type!r} with status {status_code} is not declared in ROUTE_ERRORS")
        headers = dict(headers or {})
        if retry_after is not None:
            headers["Retry-After"] = str(max(0, math.ceil(retry_after)))
        super().__init__(status_code=status_code, detail=message, headers=headers or None)
        self.error_type = error_type


def _status_type(status: int) -> str:
    if status in _STATUS_TYPES:
        return _STATUS_TYPES[status]
    try:
        return http.HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def request_id_of(scope_or_request: Scope | Request) -> str:
    scope = scope_or_request.scope if isinstance(scope_or_request, Request) else scope_or_request
    rid = scope.get(_SCOPE_KEY)
    if rid is None:  # outside the middleware (should not happen): still answer with an id
        rid = scope[_SCOPE_KEY] = uuid.uuid4().hex
    return rid


def error_response(
    request_id: str,
    status: int,
    error_type: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    details: Sequence[Mapping[str, Any]] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"type": error_type, "message": message, "request_id": request_id}
    if details is not None:
        body["details"] = list(details)
    response = JSONResponse({"error": body}, status_code=status, headers=dict(headers or {}))
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


def _internal(request_id: str) -> JSONResponse:
    return error_response(request_id, 500, "internal_error", f"{INTERNAL_ERROR_MESSAGE} ({request_id})")


def map_exception(exc: BaseException) -> tuple[int, str, str, float | None] | None:
    """(status, type, message, retry_after) for an error the API answers on purpose; None for a 500."""
    if isinstance(exc, EngineError):
        if exc.status_code >= 500 and exc.status_code not in (503, 504):
            return None
        return exc.status_code, exc.error_type, exc.message or _status_type(exc.status_code), exc.retry_after
    if isinstance(exc, FmloraError):
        for cls in type(exc).__mro__:
            if cls in LIBRARY_ERRORS:
                status, error_type = LIBRARY_ERRORS[cls]
                if error_type in _UNAVAILABLE_MESSAGES:
                    # The library's message names hosts and drivers: log it, answer a fixed one.
                    logger.warning("%s: %s", error_type, exc)
                    return status, error_type, _UNAVAILABLE_MESSAGES[error_type], UNAVAILABLE_RETRY_AFTER_S
                return status, error_type, str(exc) or error_type, None
    return None


def _validation_details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    details = []
    for error in errors:
        # Never echo the input back: it may be megabytes of base64 or a secret.
        loc = [p if isinstance(p, (str, int)) else str(p) for p in error.get("loc", ())]
        details.append({"loc": loc, "msg": str(error.get("msg", "invalid")), "type": str(error.get("type", "invalid"))})
    return details


def validation_message(details: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for d in details[:5]:
        where = ".".join(str(p) for p in d["loc"]) or "request"
        parts.append(f"{where}: {d['msg']}")
    more = f" (and {len(details) - 5} more)" if len(details) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


def _scrub_paths(request: Request, message: str) -> str:
    """Library messages may name files under the registry home (e.g. a version's missing snapshot);
    clients learn the layout relative to FMLORA_HOME, never the server's absolute paths."""
    registry = getattr(getattr(request.app.state, "fmlora", None), "registry", None)
    home = getattr(registry, "home", None)
    if home is None:
        return message
    for prefix in {str(home), str(Path(home).resolve())}:
        if prefix and prefix != "/":
            message = message.replace(prefix, "$FMLORA_HOME")
    return message


def install_error_handlers(app: FastAPI) -> None:
    """Route FastAPI's, Starlette's and our own exceptions through the envelope."""

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error_type = getattr(exc, "error_type", None) or _status_type(exc.status_code)
        message = str(exc.detail) if exc.detail else _status_type(exc.status_code).replace("_", " ")
        if exc.status_code == 404 and error_type == "not_found" and message == "Not Found":
            message = f"no route for {request.method} {request.url.path}"
        elif exc.status_code == 405 and message == "Method Not Allowed":
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(request_id_of(request), exc.status_code, error_type, message, headers=exc.headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        details = _validation_details(exc.errors())
        return error_response(
            request_id_of(request), 422, "validation_error", validation_message(details), details=details
        )

    async def typed_error(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id_of(request)
        mapped = map_exception(exc)
        if mapped is None:
            logger.error(
                "error %s in %s %s [request_id=%s]",
                type(exc).__name__,
                request.method,
                request.url.path,
                rid,
                exc_info=exc,
            )
            return _internal(rid)
        status, error_type, message, retry_after = mapped
        message = _scrub_paths(request, message)
        headers = {"Retry-After": str(max(0, math.ceil(retry_after)))} if retry_after is not None else None
        # 503 is routine while loading (probes poll it): keep it out of the warning log.
        level = logging.WARNING if status >= 500 and status != 503 else logging.DEBUG
        logger.log(level, "%s %s -> %d %s [request_id=%s]", request.method, request.url.path, status, error_type, rid)
        return error_response(rid, status, error_type, message, headers=headers)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(FmloraError, typed_error)
    app.add_exception_handler(EngineError, typed_error)


class RequestObserver(Protocol):
    def request_started(self) -> None: ...

    def request_finished(self, method: str, route: str, status: int, seconds: float) -> None: ...


class RequestContextMiddleware:
    """Outermost middleware: request id, last-resort 500 envelope, request metrics.

    A pure ASGI middleware (no BaseHTTPMiddleware), so it neither buffers bodies nor breaks streaming.
    """

    def __init__(self, app: ASGIApp, observe: RequestObserver | None = None) -> None:
        self.app = app
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for key, value in scope.get("headers", ()):
            if key == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        rid = incoming if incoming and _SANE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope[_SCOPE_KEY] = rid
        status = 0
        started = False
        t0 = time.perf_counter()
        if self.observe is not None:
            self.observe.request_started()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            status = status or 499  # nginx's convention for "client closed the request"
        except asyncio.CancelledError:
            status = status or 499
            raise
        except Exception as exc:
            if isinstance(exc, StarletteHTTPException) and not started:
                error_type = getattr(exc, "error_type", None) or _status_type(exc.status_code)
                response = error_response(rid, exc.status_code, error_type, str(exc.detail), headers=exc.headers)
            else:
                logger.error(
                    "unhandled error in %s %s [request_id=%s]",
                    scope.get("method"),
                    scope.get("path"),
                    rid,
                    exc_info=exc,
                )
                response = _internal(rid)
            if not started:
                await response(scope, receive, send_with_id)
            else:
                status = 500
        finally:
            if self.observe is not None:
                route = scope.get("route")
                template = getattr(route, "path", None) or "<unmatched>"
                try:
                    self.observe.request_finished(
                        scope.get("method", ""), template, status or 500, time.perf_counter() - t0
                    )
                except Exception:  # metrics must never break a request
                    logger.exception("request metrics failed")
