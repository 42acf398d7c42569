"""The client's exceptions: one base, transport failures, and one class per HTTP status family.

A failed response becomes the class that its error envelope's ``type`` names (the server's own word for
what went wrong) and, when the type is missing or unknown, the class of its status code::

    FmloraClientError
    ├── InvalidInputError (also ValueError)      bad arguments, caught before anything is sent
    ├── APIError
    │   ├── APIConnectionError                    the server could not be reached / the exchange broke
    │   │   └── APITimeoutError                   ... because a timeout expired
    │   ├── APIResponseValidationError            a 2xx whose body is not what the API promises
    │   └── APIStatusError                        a non-2xx answer
    │       ├── BadRequestError 400, AuthenticationError 401, PermissionDeniedError 403,
    │       │   NotFoundError 404, ConflictError 409, PayloadTooLargeError 413,
    │       │   UnsupportedMediaTypeError 415, UnprocessableEntityError 422, RateLimitError 429
    │       └── InternalServerError 5xx
    │           ├── ServiceUnavailableError 503
    │           └── GatewayTimeoutError 504
    ├── TaskFailedError                           wait_for_task: the task ended ``failed``
    │   └── TaskRejectedError                     ... or ``rejected`` by the evaluation gate
    └── WaitTimeoutError (also TimeoutError)      wait_for_task / wait_ready ran out of time
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from .models import TaskInfo

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "FmloraClientError",
    "GatewayTimeoutError",
    "InternalServerError",
    "InvalidInputError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "TaskFailedError",
    "TaskRejectedError",
    "UnprocessableEntityError",
    "UnsupportedMediaTypeError",
    "WaitTimeoutError",
    "status_error_from_response",
]


class FmloraClientError(Exception):
    """Base of every exception this package raises on purpose."""


class InvalidInputError(FmloraClientError, ValueError):
    """An argument the client cannot send (an unsupported image kind, an empty folder, a bad option)."""


class APIError(FmloraClientError):
    """Something went wrong talking to the server."""

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request


class APIConnectionError(APIError):
    """The request did not get an HTTP answer (refused, reset, DNS, protocol error)."""

    def __init__(self, message: str = "Connection error.", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APITimeoutError(APIConnectionError):
    """A connect, read, write or pool timeout expired."""

    def __init__(self, message: str = "Request timed out.", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APIResponseValidationError(APIError):
    """A successful response whose body does not have the documented shape."""

    def __init__(self, message: str, *, response: httpx.Response, body: object = None) -> None:
        super().__init__(message, request=response.request if _has_request(response) else None)
        self.response = response
        self.status_code = response.status_code
        self.body = body


class APIStatusError(APIError):
    """The server answered with a non-2xx status.

    Attributes: ``status_code``; ``body`` (the decoded JSON, or the text when it is not JSON); ``type``,
    ``message`` and ``request_id`` from the error envelope ``{"error": {"type", "message", "request_id"}}``
    (``request_id`` falls back to the ``X-Request-ID`` header); ``response``; ``retry_after`` in seconds when
    the server sent ``Retry-After``.
    """

    status_code: int

    def __init__(
        self,
        message: str,
        *,
        response: httpx.Response,
        body: object = None,
        type: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, request=response.request if _has_request(response) else None)
        self.response = response
        self.status_code = response.status_code
        self.body = body
        self.type = type
        self.request_id = request_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        kind = f" {self.type}" if self.type else ""
        rid = f" (request id {self.request_id})" if self.request_id else ""
        return f"{self.status_code}{kind}: {self.message}{rid}"


class BadRequestError(APIStatusError):
    """400: the request is malformed, e.g. an image that does not decode (type ``invalid_image``)."""


class AuthenticationError(APIStatusError):
    """401: no key, or an unknown key."""


class PermissionDeniedError(APIStatusError):
    """403: the key is valid but may not do this (e.g. an API key on an admin call)."""


class NotFoundError(APIStatusError):
    """404: no such task or version."""


class ConflictError(APIStatusError):
    """409: the state forbids it (activating a rejected version, a conflicting task)."""


class PayloadTooLargeError(APIStatusError):
    """413: the archive or an image exceeds the server's limits."""


class UnsupportedMediaTypeError(APIStatusError):
    """415: the archive is neither zip nor tar."""


class UnprocessableEntityError(APIStatusError):
    """422: well-formed but invalid (bad class layout, unknown prompt task, bad field values)."""


class RateLimitError(APIStatusError):
    """429: the server's queue is full; ``retry_after`` says when to come back."""


class InternalServerError(APIStatusError):
    """5xx: the server failed. 503 and 504 have their own subclasses."""


class ServiceUnavailableError(InternalServerError):
    """503: not ready yet (no model loaded / warming up); ``retry_after`` says when to come back."""


class GatewayTimeoutError(InternalServerError):
    """504: the server gave up on the request (its per-request timeout)."""


class TaskFailedError(FmloraClientError):
    """A task that was being waited for ended ``failed``; ``task`` holds its final state."""

    def __init__(self, task: TaskInfo) -> None:
        reason = f": {task.error}" if task.error else ""
        super().__init__(f"task {task.id} ({task.name!r}) ended {task.status}{reason}")
        self.task = task


class TaskRejectedError(TaskFailedError):
    """A task was trained but its candidate version was rejected by the evaluation gate."""


class WaitTimeoutError(FmloraClientError, TimeoutError):
    """Waiting for a condition ran past its timeout; ``last`` holds the last state seen (if any)."""

    def __init__(self, message: str, *, last: object = None) -> None:
        super().__init__(message)
        self.last = last


_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    500: InternalServerError,
    503: ServiceUnavailableError,
    504: GatewayTimeoutError,
}

# The envelope's ``type`` wins over the status: it is the server's precise word, and it survives proxies
# that rewrite statuses. Exact names first, then suffixes (``task_not_found`` -> NotFoundError).
_TYPE_CLASSES: dict[str, type[APIStatusError]] = {
    # 400
    "bad_request": BadRequestError,
    "invalid_image": BadRequestError,
    # 401 / 403
    "unauthorized": AuthenticationError,
    "unauthenticated": AuthenticationError,
    "authentication_error": AuthenticationError,
    "invalid_api_key": AuthenticationError,
    "forbidden": PermissionDeniedError,
    "permission_denied": PermissionDeniedError,
    # 404
    "not_found": NotFoundError,
    "task_not_found": NotFoundError,
    "version_not_found": NotFoundError,
    # 409
    "conflict": ConflictError,
    "version_state": ConflictError,
    "version_unavailable": ConflictError,
    "task_conflict": ConflictError,
    # 413 / 415
    "payload_too_large": PayloadTooLargeError,
    "archive_too_large": PayloadTooLargeError,
    "image_too_large": PayloadTooLargeError,
    "too_many_images": PayloadTooLargeError,
    "unsupported_media_type": UnsupportedMediaTypeError,
    "unsupported_archive": UnsupportedMediaTypeError,
    # 422
    "validation_error": UnprocessableEntityError,
    "invalid_request": UnprocessableEntityError,  # the server's engine answers it with 422 (e.g. top_k < 1)
    "unprocessable_entity": UnprocessableEntityError,
    "invalid_task": UnprocessableEntityError,
    "unsafe_archive": UnprocessableEntityError,
    "invalid_archive_image": UnprocessableEntityError,
    "invalid_class_layout": UnprocessableEntityError,
    "invalid_prompt": UnprocessableEntityError,
    "unknown_task": UnprocessableEntityError,
    # 429
    "too_many_requests": RateLimitError,
    "rate_limited": RateLimitError,
    "queue_full": RateLimitError,
    # 5xx
    "internal_error": InternalServerError,
    "internal_server_error": InternalServerError,
    "service_unavailable": ServiceUnavailableError,
    "not_ready": ServiceUnavailableError,
    "no_model": ServiceUnavailableError,
    "engine_failed": ServiceUnavailableError,
    "timeout": GatewayTimeoutError,
    "gateway_timeout": GatewayTimeoutError,
}
# Families a new, more specific type most likely belongs to (``snapshot_not_found`` -> NotFoundError).
_TYPE_SUFFIXES: tuple[tuple[str, type[APIStatusError]], ...] = (
    ("_not_found", NotFoundError),
    ("_too_large", PayloadTooLargeError),
    ("_conflict", ConflictError),
)


def class_for(status_code: int, error_type: str | None) -> type[APIStatusError]:
    """The exception class for a failed response: its envelope ``type`` first, then its status."""
    if error_type:
        key = error_type.strip().lower().replace("-", "_")
        if key in _TYPE_CLASSES:
            return _TYPE_CLASSES[key]
        for suffix, cls in _TYPE_SUFFIXES:
            if key.endswith(suffix):
                return cls
    if status_code in _STATUS_CLASSES:
        return _STATUS_CLASSES[status_code]
    if status_code >= 500:
        return InternalServerError
    return APIStatusError


def _has_request(response: httpx.Response) -> bool:
    try:
        response.request  # noqa: B018 - raises RuntimeError when the response was built without one
    except RuntimeError:
        return False
    return True


def _decode_body(response: httpx.Response) -> object:
    try:
        content = response.read()
    except httpx.HTTPError:
        return None
    if not content:
        return None
    try:
        return json.loads(content)
    except ValueError:
        return response.text


def status_error_from_response(response: httpx.Response, *, retry_after: float | None = None) -> APIStatusError:
    """Build the typed exception for a non-2xx response from its error envelope, headers and status."""
    body = _decode_body(response)
    error_type: str | None = None
    message: str | None = None
    request_id: str | None = None
    envelope: Any = body.get("error") if isinstance(body, dict) else None
    if isinstance(envelope, dict):
        error_type = envelope.get("type") if isinstance(envelope.get("type"), str) else None
        message = envelope.get("message") if isinstance(envelope.get("message"), str) else None
        request_id = envelope.get("request_id") if isinstance(envelope.get("request_id"), str) else None
    elif isinstance(envelope, str):  # {"error": "text"}
        message = envelope
    elif isinstance(body, dict) and isinstance(body.get("detail"), str):  # a bare framework error
        message = body["detail"]
    if message is None:
        if isinstance(body, str) and body.strip():
            message = body.strip()[:500]
        else:
            message = response.reason_phrase or "HTTP error"
    request_id = request_id or response.headers.get("x-request-id")
    cls = class_for(response.status_code, error_type)
    return cls(message, response=response, body=body, type=error_type, request_id=request_id, retry_after=retry_after)
