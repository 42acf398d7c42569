"""Errors of the framework-free serving core (engine, batcher, version cache, image decoding).

Each class carries the HTTP status and the snake_case error type the app should answer with, so the
web layer can map them without a table of its own; messages are safe to show to a client (they never
hold exception text from a library, paths or tracebacks). ``retry_after`` (seconds) is set on the
errors that deserve a ``Retry-After`` header.
"""

from __future__ import annotations

from fmlora.errors import DataError

__all__ = [
    "EngineError",
    "ImageTooLarge",
    "InferenceError",
    "InvalidImageInput",
    "InvalidRequestError",
    "NoModelError",
    "NotReadyError",
    "QueueFullError",
    "RequestTimeoutError",
    "VersionUnavailableError",
]


class EngineError(Exception):
    """Base of every error the serving core raises on purpose."""

    status_code: int = 500
    error_type: str = "internal_error"
    retry_after: float | None = None

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        if retry_after is not None:
            self.retry_after = retry_after

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidImageInput(EngineError, DataError):
    """The bytes are not a decodable image of a supported format (400). Also a DataError, so a
    mapping written for the library's errors answers it the same way."""

    status_code = 400
    error_type = "invalid_image"


class ImageTooLarge(EngineError):
    """The image's pixel count (read from its header, before decoding) exceeds the limit (413)."""

    status_code = 413
    error_type = "image_too_large"


class InvalidRequestError(EngineError, ValueError):
    """A request argument is out of range: no images, ``top_k`` < 1 (422)."""

    status_code = 422
    error_type = "invalid_request"


class QueueFullError(EngineError):
    """The batcher's bounded queue is full: back off and retry after ``retry_after`` seconds (429)."""

    status_code = 429
    error_type = "queue_full"
    retry_after = 1.0


class RequestTimeoutError(EngineError):
    """The request did not complete within its timeout; its images that had not started were
    skipped (504)."""

    status_code = 504
    error_type = "timeout"


class NotReadyError(EngineError):
    """The engine is not started yet, or is stopping (503)."""

    status_code = 503
    error_type = "not_ready"
    retry_after = 1.0


class NoModelError(NotReadyError):
    """The engine runs but no version is live yet: no task has been learned (503)."""

    error_type = "no_model"
    retry_after = 5.0


class VersionUnavailableError(EngineError):
    """A pinned version exists in the registry but its snapshot cannot be served (missing, corrupt
    or incompatible); retrying will not help (409)."""

    status_code = 409
    error_type = "version_unavailable"


class InferenceError(EngineError):
    """The model failed on a batch, or returned a result that does not match its inputs (500)."""

    status_code = 500
    error_type = "internal_error"
