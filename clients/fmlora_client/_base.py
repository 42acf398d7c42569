"""What Client and AsyncClient share: settings, request building, response decoding, error mapping, the
retry decision, predict batching and merging, and the wait-for-task conditions. No I/O happens here."""

from __future__ import annotations

import base64
import json
import logging
import platform
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from ._config import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, ClientSettings
from ._images import EncodedImage
from ._retry import RetryPolicy, retry_after_from
from ._version import __version__
from .errors import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    InvalidInputError,
    TaskFailedError,
    TaskRejectedError,
    status_error_from_response,
)
from .models import Activation, ImageResult, ModelsInfo, Prediction, TaskInfo, TaskSubmission, VersionInfo

log = logging.getLogger("fmlora_client")

Auth = Literal["api", "admin", "none"]
Until = Literal["published", "live"]
Encoding = Literal["multipart", "json"]
PromptArg = str | Mapping[str, Any]
M = TypeVar("M", bound=BaseModel)

DEFAULT_BATCH_SIZE = 32
# A bound on one predict request's image bytes, so a long list of large photos never becomes one huge body.
DEFAULT_MAX_BATCH_BYTES = 16 * 1024 * 1024
IDEMPOTENCY_HEADER = "Idempotency-Key"


class _NotGiven:
    def __repr__(self) -> str:
        return "NOT_GIVEN"

    def __bool__(self) -> bool:
        return False


NOT_GIVEN: Any = _NotGiven()


def _user_agent() -> str:
    return f"fmlora-client/{__version__} httpx/{httpx.__version__} python/{platform.python_version()}"


@dataclass
class RequestSpec:
    """One API call, before it becomes an httpx.Request (it is rebuilt for every attempt)."""

    method: str
    path: str
    auth: Auth = "api"
    idempotent: bool = False
    params: dict[str, Any] | None = None
    json: Any = None
    data: dict[str, Any] | None = None
    files: list[tuple[str, Any]] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def validate_prompt(prompt: PromptArg) -> str | dict[str, Any]:
    """``"auto"``, ``"none"`` or ``{"task": NAME}`` (passed through; the server has the last word)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Mapping):
        return dict(prompt)
    raise InvalidInputError(f"prompt must be 'auto', 'none' or {{'task': NAME}}, got {type(prompt).__name__}")


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_version(version: object) -> int | None:
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidInputError(f"version must be a positive integer (versions start at 1) or None, got {version!r}")
    return version


def predict_spec(
    batch: list[EncodedImage], *, top_k: int, prompt: str | dict[str, Any], version: int | None, encoding: Encoding
) -> RequestSpec:
    """POST /predict for one batch: multipart ``images`` files plus form fields, or a JSON body of base64."""
    if encoding == "json":
        body: dict[str, Any] = {
            "images": [base64.b64encode(image.data).decode("ascii") for image in batch],
            "top_k": top_k,
            "prompt": prompt,
        }
        if version is not None:
            body["version"] = version
        return RequestSpec("POST", "/predict", auth="api", idempotent=True, json=body)
    if encoding != "multipart":
        raise InvalidInputError(f"encoding must be 'multipart' or 'json', got {encoding!r}")
    # Form values are strings: a {"task": NAME} prompt travels as its JSON text.
    form: dict[str, Any] = {"top_k": str(top_k), "prompt": prompt if isinstance(prompt, str) else json.dumps(prompt)}
    if version is not None:
        form["version"] = str(version)
    files = [("images", (image.filename, image.data, image.content_type)) for image in batch]
    return RequestSpec("POST", "/predict", auth="api", idempotent=True, data=form, files=files)


def submit_spec(upload: Any, *, name: str, kind: str, idempotency_key: str) -> RequestSpec:
    """POST /tasks: the ``archive`` file plus ``name``/``kind``; the idempotency key makes retries safe."""
    return RequestSpec(
        "POST",
        "/tasks",
        auth="admin",
        idempotent=True,  # safe: the server returns the already stored task for a repeated key
        data={"name": name, "kind": kind},
        files=[("archive", (upload.filename, upload.file, upload.content_type))],
        headers={IDEMPOTENCY_HEADER: idempotency_key},
    )


def task_path(task_id: str) -> str:
    if not isinstance(task_id, str) or not task_id:
        raise InvalidInputError(f"task id must be a non-empty string, got {task_id!r}")
    return "/tasks/" + quote(task_id, safe="")


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


def merge_predictions(chunks: list[tuple[int, Prediction]]) -> Prediction:
    """Concatenate batch answers in order. Each result keeps the version of the request that produced it."""
    results: list[ImageResult] = []
    for _, chunk in chunks:
        for result in chunk.results:
            if "model_version" in result.model_fields_set or "snapshot_sha256" in result.model_fields_set:
                results.append(result)
            else:
                update = {"model_version": chunk.model_version, "snapshot_sha256": chunk.snapshot_sha256}
                results.append(result.model_copy(update=update))
    last = chunks[-1][1] if chunks else Prediction()
    return last.model_copy(update={"results": results})  # the last answer's version and extra fields


def check_batch_answer(prediction: Prediction, sent: int, response: httpx.Response) -> None:
    if len(prediction.results) != sent:
        raise APIResponseValidationError(
            f"sent {sent} images but got {len(prediction.results)} results", response=response, body=None
        )


def task_settled(task: TaskInfo, until: Until) -> bool:
    """Whether a polled task satisfies ``until`` as far as the task alone can say; raises if it ended badly.

    For ``until="live"`` a True answer still needs ``live_reached`` on GET /models.
    """
    if task.status == "rejected":
        raise TaskRejectedError(task)
    if task.status == "failed":
        raise TaskFailedError(task)
    if until == "published":
        return task.status == "live"
    return task.status == "live" and task.version is not None


def live_reached(task: TaskInfo, models: ModelsInfo) -> bool:
    """Read-your-writes: the replica that answered serves the task's version (or a newer live one holding it).

    True when ``live == task.version`` and ``serving >= task.version``; or, when a later task already moved
    the live pointer on, when the replica serves that live version and its task list includes this task.
    """
    version = task.version
    if version is None or models.live is None or models.serving is None:
        return False
    if models.live == version:
        return models.serving >= version
    if models.live > version and models.serving >= models.live:
        live: VersionInfo | None = models.get(models.live)
        return live is not None and task.name in live.tasks
    return False


def check_until(until: str) -> Until:
    if until not in ("published", "live"):
        raise InvalidInputError(f"until must be 'published' or 'live', got {until!r}")
    return until  # type: ignore[return-value]


def parse_activation(body: Any, version: int) -> Activation:
    """``{"live", "serving", "version": {...}, "warning"}``; a bare version or an empty body still parse."""
    if isinstance(body, dict):
        if "live" in body:
            try:
                return Activation.model_validate(body)
            except ValidationError:
                pass
        try:
            info = VersionInfo.model_validate(body)
        except ValidationError:
            pass
        else:
            return Activation(live=info.version, version=info)
    return Activation(live=version)


def parse_submission(response: httpx.Response, submission: TaskSubmission) -> TaskSubmission:
    """Mark a replayed submission (the server answered a repeated idempotency key with the stored task)."""
    replayed = response.headers.get("idempotent-replayed", "").lower() == "true" or response.status_code == 200
    return submission.model_copy(update={"replayed": True}) if replayed and not submission.replayed else submission


def task_list_params(limit: int | None, status: str | None) -> dict[str, Any] | None:
    params: dict[str, Any] = {}
    if limit is not None:
        params["limit"] = check_positive_int("limit", limit)
    if status is not None:
        params["status"] = status
    return params or None


class BaseClient:
    """Configuration and the I/O-free half of every call; Client and AsyncClient add the transport loop."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float | httpx.Timeout | None = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        owns_http_client: bool,
    ) -> None:
        self._settings = ClientSettings.resolve(base_url, api_key=api_key, admin_key=admin_key)
        self._retry = retry if retry is not None else RetryPolicy(max_retries=max_retries)
        # With an injected http_client and no explicit timeout, that client's own timeout applies.
        if timeout is NOT_GIVEN:
            self._timeout: httpx.Timeout | _NotGiven | None = NOT_GIVEN if not owns_http_client else DEFAULT_TIMEOUT
        else:
            self._timeout = timeout if isinstance(timeout, httpx.Timeout) or timeout is None else httpx.Timeout(timeout)
        self._headers = {"User-Agent": _user_agent(), "Accept": "application/json", **dict(headers or {})}
        self._owns_http_client = owns_http_client

    @property
    def base_url(self) -> str:
        return self._settings.base_url

    @property
    def settings(self) -> ClientSettings:
        return self._settings

    @property
    def retry_policy(self) -> RetryPolicy:
        return self._retry

    @property
    def timeout(self) -> httpx.Timeout | None:
        return None if self._timeout is NOT_GIVEN else self._timeout

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # -- requests ------------------------------------------------------------------------------------------

    def _build_request(self, http: httpx.Client | httpx.AsyncClient, spec: RequestSpec) -> httpx.Request:
        headers = dict(self._headers)
        key = self._settings.key_for(spec.auth)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        headers.update(spec.headers)
        extra: dict[str, Any] = {}
        if self._timeout is not NOT_GIVEN:
            extra["timeout"] = self._timeout
        return http.build_request(
            spec.method,
            self._settings.url(spec.path),
            params=spec.params,
            json=spec.json,
            data=spec.data,
            files=spec.files,
            headers=headers,
            **extra,
        )

    @staticmethod
    def _transport_error(exc: httpx.TransportError, request: httpx.Request) -> APIConnectionError:
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(f"request timed out: {exc}", request=request)
        return APIConnectionError(f"connection error: {exc or type(exc).__name__}", request=request)

    @staticmethod
    def _retryable_transport_error(exc: httpx.TransportError) -> bool:
        # A URL with a bad scheme fails the same way every time; everything else may be transient.
        return not isinstance(exc, httpx.UnsupportedProtocol)

    def _retry_delay_for_status(self, spec: RequestSpec, attempt: int, response: httpx.Response) -> float | None:
        if not spec.idempotent:
            return None
        return self._retry.delay_after_status(attempt, response)

    def _retry_delay_for_error(self, spec: RequestSpec, attempt: int, exc: httpx.TransportError) -> float | None:
        if not spec.idempotent or not self._retryable_transport_error(exc):
            return None
        return self._retry.delay_after_error(attempt)

    @staticmethod
    def _log_retry(spec: RequestSpec, attempt: int, delay: float, why: str) -> None:
        log.info("retrying %s %s in %.2fs (retry %d) after %s", spec.method, spec.path, delay, attempt + 1, why)

    @staticmethod
    def _status_error(response: httpx.Response) -> APIStatusError:
        return status_error_from_response(response, retry_after=retry_after_from(response))

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise APIResponseValidationError(
                f"{response.request.method} {response.request.url.path}: expected JSON, got "
                f"{response.headers.get('content-type', 'no content type')}",
                response=response,
                body=response.text[:500],
            ) from exc

    @classmethod
    def _parse(cls, response: httpx.Response, model: type[M]) -> M:
        body = cls._json(response)
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise APIResponseValidationError(
                f"{response.request.method} {response.request.url.path}: unexpected response shape for "
                f"{model.__name__}: {exc.errors(include_url=False)[:3]}",
                response=response,
                body=body,
            ) from exc

    @classmethod
    def _parse_task_list(cls, response: httpx.Response) -> list[TaskInfo]:
        body = cls._json(response)
        items = body.get("tasks") if isinstance(body, dict) else body
        if not isinstance(items, list):
            raise APIResponseValidationError("GET /tasks: expected {'tasks': [...]}", response=response, body=body)
        try:
            return [TaskInfo.model_validate(item) for item in items]
        except ValidationError as exc:
            raise APIResponseValidationError(
                f"GET /tasks: bad task entry: {exc}", response=response, body=body
            ) from exc
