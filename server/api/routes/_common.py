"""Helpers shared by the route modules: the app state, multipart parsing with limits, media types."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser

from server.api.errors import ApiError
from server.api.schemas import ErrorEnvelope

if TYPE_CHECKING:
    from server.api.state import ServerState

T = TypeVar("T")

FORM_FIELD_BYTES = 64 * 1024

COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorEnvelope, "description": "Validation error (the details list each bad field)."},
    500: {"model": ErrorEnvelope, "description": "Internal error; the message quotes the request id, never details."},
}


def get_state(request: Request) -> ServerState:
    return request.app.state.fmlora


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def parse_multipart(request: Request, *, max_files: int, max_fields: int, what: str) -> FormData:
    """Parse a multipart body: files spool to temporary files (memory up to 1 MiB, then disk), text
    fields are capped at 64 KiB, and the total is bounded by the body-size middleware. The caller
    must ``await form.close()``."""
    parser = MultiPartParser(
        request.headers, request.stream(), max_files=max_files, max_fields=max_fields, max_part_size=FORM_FIELD_BYTES
    )
    try:
        return await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise ApiError(413, f"too_many_{what}", f"too many {what} in one request (at most {max_files})") from None
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc.message}") from None
