"""The asynchronous client: the same calls as Client, awaitable (asyncio or trio, through anyio)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import IO, Any

import anyio
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
from ._images import EncodedImage, iter_batches
from ._retry import RetryPolicy
from .errors import APIConnectionError, InvalidInputError, ServiceUnavailableError, WaitTimeoutError
from .models import Activation, Health, Info, ModelsInfo, Prediction, TaskInfo, TaskSubmission


def _first_error(group: BaseException) -> BaseException:
    """The first real exception inside a (nested) exception group from a task group."""
    inner = getattr(group, "exceptions", None)
    if not inner:
        return group
    return _first_error(inner[0])


async def _batches_off_loop(images: Any, batch_size: int, max_batch_bytes: int) -> AsyncIterator[list[EncodedImage]]:
    """``iter_batches`` with each batch read and encoded in a worker thread: opening files and encoding
    PIL images or arrays never blocks the event loop."""
    batches = iter_batches(images, batch_size, max_batch_bytes)
    while True:
        batch = await anyio.to_thread.run_sync(next, batches, None)
        if batch is None:
            return
        yield batch


class AsyncClient(BaseClient):
    """Asynchronous client for an fmlora server; see :class:`fmlora_client.Client` for the settings.

    ``transport=`` takes an ``httpx.AsyncBaseTransport`` (``httpx.MockTransport`` works), ``http_client=``
    an ``httpx.AsyncClient`` (not closed by :meth:`aclose`). Use as an async context manager::

        async with AsyncClient() as client:
            prediction = await client.predict(["cat.jpg"])
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
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
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
        self._http = http_client if http_client is not None else httpx.AsyncClient(transport=transport)
        self._sleep: Callable[[float], Awaitable[None]] = anyio.sleep
        self._clock: Callable[[], float] = time.monotonic

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection pool (unless the http_client was injected)."""
        if self._owns_http_client:
            await self._http.aclose()

    close = aclose

    @property
    def is_closed(self) -> bool:
        return self._http.is_closed

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- transport loop ------------------------------------------------------------------------------------

    async def _send(self, spec: RequestSpec) -> httpx.Response:
        """Send with retries (idempotent calls only); return a 2xx response or raise the typed error."""
        attempt = 0
        while True:
            request = self._build_request(self._http, spec)
            try:
                response = await self._http.send(request)
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
                await response.aclose()
            await self._sleep(delay)
            attempt += 1

    # -- predictions ---------------------------------------------------------------------------------------

    async def _predict_batch(
        self, batch: list[EncodedImage], top_k: int, prompt: Any, version: int | None, encoding: Encoding
    ) -> Prediction:
        spec = predict_spec(batch, top_k=top_k, prompt=prompt, version=version, encoding=encoding)
        response = await self._send(spec)
        chunk = self._parse(response, Prediction)
        check_batch_answer(chunk, len(batch), response)
        return chunk

    async def predict(
        self,
        images: Any,
        *,
        top_k: int = 5,
        prompt: PromptArg = "auto",
        version: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        encoding: Encoding = "multipart",
        concurrency: int = 1,
    ) -> Prediction:
        """Classify one image or many; see :meth:`fmlora_client.Client.predict`.

        ``concurrency`` > 1 keeps up to that many batch requests in flight at once (results stay in input
        order; each keeps the version that answered it). The first failure cancels the rest and is raised.
        """
        top_k = check_positive_int("top_k", top_k)
        batch_size = check_positive_int("batch_size", batch_size)
        max_batch_bytes = check_positive_int("max_batch_bytes", max_batch_bytes)
        concurrency = check_positive_int("concurrency", concurrency)
        prompt_value = validate_prompt(prompt)
        version = check_version(version)
        batches = _batches_off_loop(images, batch_size, max_batch_bytes)
        chunks: dict[int, tuple[int, Prediction]] = {}
        if concurrency == 1:
            index = 0
            async for batch in batches:
                chunks[index] = (len(batch), await self._predict_batch(batch, top_k, prompt_value, version, encoding))
                index += 1
        else:
            slots = anyio.Semaphore(concurrency)

            async def run(index: int, batch: list[EncodedImage]) -> None:
                try:
                    prediction = await self._predict_batch(batch, top_k, prompt_value, version, encoding)
                    chunks[index] = (len(batch), prediction)
                finally:
                    slots.release()

            try:
                async with anyio.create_task_group() as group:
                    index = 0
                    await slots.acquire()  # encoding stays bounded: a slot before each batch is encoded
                    async for batch in batches:
                        group.start_soon(run, index, batch)
                        index += 1
                        await slots.acquire()
                    slots.release()
            except Exception as exc:  # an exception group: raise the first real error, as a plain call would
                raise _first_error(exc) from None
        if not chunks:
            raise InvalidInputError("predict needs at least one image")
        return merge_predictions([chunks[i] for i in sorted(chunks)])

    # -- tasks ---------------------------------------------------------------------------------------------

    async def submit_task(
        self,
        path: str | os.PathLike | IO[bytes],
        *,
        name: str,
        kind: str = "class",
        idempotency_key: str | None = None,
    ) -> TaskSubmission:
        """Upload a new task; see :meth:`fmlora_client.Client.submit_task`."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidInputError("submit_task needs a non-empty name")
        if kind not in ("class", "domain"):
            raise InvalidInputError(f"kind must be 'class' or 'domain', got {kind!r}")
        key = idempotency_key or new_idempotency_key()
        # Zipping a folder reads every file: do it (and the clean-up) in a worker thread, not on the loop.
        upload_context = open_upload(path)
        upload = await anyio.to_thread.run_sync(upload_context.__enter__)
        try:
            response = await self._send(submit_spec(upload, name=name, kind=kind, idempotency_key=key))
        finally:
            await anyio.to_thread.run_sync(upload_context.__exit__, None, None, None)
        return parse_submission(response, self._parse(response, TaskSubmission))

    async def get_task(self, task_id: str) -> TaskInfo:
        return self._parse(await self._send(RequestSpec("GET", task_path(task_id), idempotent=True)), TaskInfo)

    async def list_tasks(self, *, limit: int | None = None, status: str | None = None) -> list[TaskInfo]:
        spec = RequestSpec("GET", "/tasks", idempotent=True, params=task_list_params(limit, status))
        return self._parse_task_list(await self._send(spec))

    async def wait_for_task(
        self,
        task_id: str,
        *,
        until: Until = "live",
        timeout: float | None = 600.0,
        poll_interval: float = 1.0,
        on_update: Callable[[TaskInfo], None] | None = None,
    ) -> TaskInfo:
        """Poll until the task is ``published`` or ``live``; see :meth:`fmlora_client.Client.wait_for_task`."""
        until = check_until(until)
        if poll_interval <= 0:
            raise InvalidInputError("poll_interval must be > 0")
        deadline = None if timeout is None else self._clock() + timeout
        last: TaskInfo | None = None
        while True:
            task = await self.get_task(task_id)
            if on_update is not None and task != last:
                on_update(task)
            last = task
            if task_settled(task, until) and (until == "published" or live_reached(task, await self.models())):
                return task
            remaining = None if deadline is None else deadline - self._clock()
            if remaining is not None and remaining <= 0:
                raise WaitTimeoutError(
                    f"task {task_id} not {until} after {timeout:g}s (status {task.status}, version {task.version})",
                    last=task,
                )
            await self._sleep(poll_interval if remaining is None else min(poll_interval, remaining))

    # -- models --------------------------------------------------------------------------------------------

    async def models(self) -> ModelsInfo:
        return self._parse(await self._send(RequestSpec("GET", "/models", idempotent=True)), ModelsInfo)

    async def activate(self, version: int) -> Activation:
        """Make ``version`` live. Needs the admin key. Never retried automatically."""
        version = check_version(version)
        if version is None:
            raise InvalidInputError("activate needs a version number")
        response = await self._send(RequestSpec("POST", f"/models/{version}/activate", auth="admin"))
        return parse_activation(self._json(response) if response.content else None, version)

    # -- service -------------------------------------------------------------------------------------------

    async def health(self) -> Health:
        return self._parse(await self._send(RequestSpec("GET", "/healthz", idempotent=True)), Health)

    async def ready(self) -> bool:
        try:
            await self._send(RequestSpec("GET", "/readyz", idempotent=False))
        except ServiceUnavailableError:
            return False
        return True

    async def wait_ready(self, *, timeout: float = 60.0, poll_interval: float = 0.5) -> None:
        deadline = self._clock() + timeout
        while True:
            try:
                if await self.ready():
                    return
                last: object = "not ready (503)"
            except APIConnectionError as exc:
                last = exc
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise WaitTimeoutError(f"server at {self.base_url} not ready after {timeout:g}s: {last}", last=last)
            await self._sleep(min(poll_interval, remaining))

    async def info(self) -> Info:
        return self._parse(await self._send(RequestSpec("GET", "/info", idempotent=True)), Info)
