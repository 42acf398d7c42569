"""The synchronous client."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import IO, Any

import httpx

from ._archive import open_upload
from ._base import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_BATCH_BYTES,
    NOT_GIVEN,
    BaseClient,
    Encoding,
    PromptArg,
    RequestSpec,
    Until,
    check_batch_answer,
    check_positive_int,
    check_until,
    check_version,
    live_reached,
    merge_predictions,
    new_idempotency_key,
    parse_activation,
    parse_submission,
    predict_spec,
    submit_spec,
    task_list_params,
    task_path,
    task_settled,
    validate_prompt,
)
from ._config import DEFAULT_MAX_RETRIES
from ._images import iter_batches
from ._retry import RetryPolicy
from .errors import APIConnectionError, InvalidInputError, ServiceUnavailableError, WaitTimeoutError
from .models import Activation, Health, Info, ModelsInfo, Prediction, TaskInfo, TaskSubmission


class Client(BaseClient):
    """Synchronous client for an fmlora server.

    ``base_url``, ``api_key`` and ``admin_key`` default to ``FMLORA_URL`` (else http://127.0.0.1:8000),
    ``FMLORA_API_KEY`` and ``FMLORA_ADMIN_KEY``. The admin key is sent for ``submit_task`` and ``activate``,
    the API key for every other call; each falls back to the other when it is not set.

    ``timeout`` defaults to 60 s (10 s to connect); ``max_retries`` (default 2) applies to idempotent calls
    only. Pass ``transport=`` (e.g. ``httpx.MockTransport``) or a ready ``http_client=``; an injected
    ``http_client`` is not closed by :meth:`close`. Use as a context manager::

        with Client() as client:
            print(client.predict(["cat.jpg"]).labels)
    """

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
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        if http_client is not None and transport is not None:
            raise InvalidInputError("pass either transport= or http_client=, not both")
        super().__init__(
            base_url,
            api_key=api_key,
            admin_key=admin_key,
            timeout=timeout,
            max_retries=max_retries,
            retry=retry,
            headers=headers,
            owns_http_client=http_client is None,
        )
        self._http = http_client if http_client is not None else httpx.Client(transport=transport)
        self._sleep: Callable[[float], None] = time.sleep
        self._clock: Callable[[], float] = time.monotonic

    # -- lifecycle -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool (unless the http_client was injected)."""
        if self._owns_http_client:
            self._http.close()

    @property
    def is_closed(self) -> bool:
        return self._http.is_closed

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- transport loop ------------------------------------------------------------------------------------

    def _send(self, spec: RequestSpec) -> httpx.Response:
        """Send with retries (idempotent calls only); return a 2xx response or raise the typed error."""
        attempt = 0
        while True:
            request = self._build_request(self._http, spec)
            try:
                response = self._http.send(request)
            except httpx.TransportError as exc:
                delay = self._retry_delay_for_error(spec, attempt, exc)
                if delay is None:
                    raise self._transport_error(exc, request) from exc
                self._log_retry(spec, attempt, delay, type(exc).__name__)
            else:
                if response.is_success:
                    return response
                delay = self._retry_delay_for_status(spec, attempt, response)
                if delay is None:
                    raise self._status_error(response)
                self._log_retry(spec, attempt, delay, f"HTTP {response.status_code}")
                response.close()
            self._sleep(delay)
            attempt += 1

    # -- predictions ---------------------------------------------------------------------------------------

    def predict(
        self,
        images: Any,
        *,
        top_k: int = 5,
        prompt: PromptArg = "auto",
        version: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        encoding: Encoding = "multipart",
    ) -> Prediction:
        """Classify one image or many; one result per image, in input order.

        ``images``: a path, encoded bytes, a binary file, a PIL image, a uint8 HxWx3 numpy array, a sequence
        of those, or an NxHxWx3 array. Inputs are encoded lazily and sent in requests of at most
        ``batch_size`` images and ``max_batch_bytes`` bytes. ``prompt``: ``"auto"``, ``"none"`` or
        ``{"task": NAME}``; ``version`` pins a published version (default: the live one). ``encoding``:
        ``"multipart"`` (default) or ``"json"`` (base64). Predictions are idempotent, so they are retried.
        """
        top_k = check_positive_int("top_k", top_k)
        batch_size = check_positive_int("batch_size", batch_size)
        max_batch_bytes = check_positive_int("max_batch_bytes", max_batch_bytes)
        prompt_value = validate_prompt(prompt)
        version = check_version(version)
        chunks: list[tuple[int, Prediction]] = []
        for batch in iter_batches(images, batch_size, max_batch_bytes):
            spec = predict_spec(batch, top_k=top_k, prompt=prompt_value, version=version, encoding=encoding)
            response = self._send(spec)
            chunk = self._parse(response, Prediction)
            check_batch_answer(chunk, len(batch), response)
            chunks.append((len(batch), chunk))
        if not chunks:
            raise InvalidInputError("predict needs at least one image")
        return merge_predictions(chunks)

    # -- tasks ---------------------------------------------------------------------------------------------

    def submit_task(
        self,
        path: str | os.PathLike | IO[bytes],
        *,
        name: str,
        kind: str = "class",
        idempotency_key: str | None = None,
    ) -> TaskSubmission:
        """Upload a new task: a folder (one sub-folder per class; zipped on the fly) or a zip/tar archive.

        Sent with an ``Idempotency-Key`` (a fresh uuid4 unless given) reused by every retry, so a retried
        upload never creates a second task. Needs the admin key. Returns the queued task's id and status.
        """
        if not isinstance(name, str) or not name.strip():
            raise InvalidInputError("submit_task needs a non-empty name")
        if kind not in ("class", "domain"):
            raise InvalidInputError(f"kind must be 'class' or 'domain', got {kind!r}")
        key = idempotency_key or new_idempotency_key()
        with open_upload(path) as upload:
            response = self._send(submit_spec(upload, name=name, kind=kind, idempotency_key=key))
        return parse_submission(response, self._parse(response, TaskSubmission))

    def get_task(self, task_id: str) -> TaskInfo:
        """The task's status, progress, metrics, version and error."""
        return self._parse(self._send(RequestSpec("GET", task_path(task_id), idempotent=True)), TaskInfo)

    def list_tasks(self, *, limit: int | None = None, status: str | None = None) -> list[TaskInfo]:
        """Tasks, newest first; at most ``limit`` (the server's default otherwise), optionally of one ``status``."""
        spec = RequestSpec("GET", "/tasks", idempotent=True, params=task_list_params(limit, status))
        return self._parse_task_list(self._send(spec))

    def wait_for_task(
        self,
        task_id: str,
        *,
        until: Until = "live",
        timeout: float | None = 600.0,
        poll_interval: float = 1.0,
        on_update: Callable[[TaskInfo], None] | None = None,
    ) -> TaskInfo:
        """Poll until the task is ``published`` or ``live``; return its final state.

        ``until="live"`` (default) is read-your-writes: it returns only once GET /models on this server shows
        the task's version live and served (``serving >= version``), so predictions made afterwards see the
        task's labels. Raises TaskRejectedError / TaskFailedError when the task ends rejected / failed, and
        WaitTimeoutError after ``timeout`` seconds (None waits for ever). ``on_update`` is called with each
        task state that differs from the previous one.
        """
        until = check_until(until)
        if poll_interval <= 0:
            raise InvalidInputError("poll_interval must be > 0")
        deadline = None if timeout is None else self._clock() + timeout
        last: TaskInfo | None = None
        while True:
            task = self.get_task(task_id)
            if on_update is not None and task != last:
                on_update(task)
            last = task
            if task_settled(task, until) and (until == "published" or live_reached(task, self.models())):
                return task
            remaining = None if deadline is None else deadline - self._clock()
            if remaining is not None and remaining <= 0:
                raise WaitTimeoutError(
                    f"task {task_id} not {until} after {timeout:g}s (status {task.status}, version {task.version})",
                    last=task,
                )
            self._sleep(poll_interval if remaining is None else min(poll_interval, remaining))

    # -- models --------------------------------------------------------------------------------------------

    def models(self) -> ModelsInfo:
        """Every version with its evaluation card, the live one, and the one this replica serves."""
        return self._parse(self._send(RequestSpec("GET", "/models", idempotent=True)), ModelsInfo)

    def activate(self, version: int) -> Activation:
        """Make ``version`` live (roll back or forward). Needs the admin key. Never retried automatically."""
        version = check_version(version)
        if version is None:
            raise InvalidInputError("activate needs a version number")
        response = self._send(RequestSpec("POST", f"/models/{version}/activate", auth="admin"))
        return parse_activation(self._json(response) if response.content else None, version)

    # -- service -------------------------------------------------------------------------------------------

    def health(self) -> Health:
        """GET /healthz: the process is up."""
        return self._parse(self._send(RequestSpec("GET", "/healthz", idempotent=True)), Health)

    def ready(self) -> bool:
        """GET /readyz: True when the server can predict, False while it answers 503 (not ready)."""
        try:
            self._send(RequestSpec("GET", "/readyz", idempotent=False))
        except ServiceUnavailableError:
            return False
        return True

    def wait_ready(self, *, timeout: float = 60.0, poll_interval: float = 0.5) -> None:
        """Block until ``ready()``; connection failures count as not ready yet. WaitTimeoutError after ``timeout``."""
        deadline = self._clock() + timeout
        while True:
            try:
                if self.ready():
                    return
                last: object = "not ready (503)"
            except APIConnectionError as exc:
                last = exc
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise WaitTimeoutError(f"server at {self.base_url} not ready after {timeout:g}s: {last}", last=last)
            self._sleep(min(poll_interval, remaining))

    def info(self) -> Info:
        """GET /info: what the server reports about itself."""
        return self._parse(self._send(RequestSpec("GET", "/info", idempotent=True)), Info)
