"""A micro-batcher that feeds one dedicated inference thread, framework-free.

Requests (a key and a list of items) wait in one bounded FIFO queue. The inference thread forms a
batch from the oldest request's key: every waiting request with that key, in arrival order, up to
``max_batch_size`` items (a large request is split across batches), once the batch is full or the
oldest request has waited ``max_wait_s``. So one batch never mixes keys; the engine uses the
snapshot version as the key, and a batch runs entirely on one version.

* The batch function runs in the inference thread only, never on an event loop; callers await a
  future (``run``) or block on it (``run_sync``). Results reach each caller's own event loop, so the
  batcher works with any number of loops and threads.
* The queue is bounded in items: a full queue raises ``QueueFullError`` at once, with a
  ``retry_after`` estimated from the measured throughput (backpressure instead of piling up).
* Each request has a timeout (``RequestTimeoutError``); the items of a request that timed out or
  was cancelled are skipped if they have not started.
* The batch function must return one result per item (checked). If it raises on a batch of several
  requests, each request is re-run alone, so one bad request fails only itself.
* ``call(fn)`` runs a control job in the inference thread between two batches (e.g. a warm-up).
* ``stop`` drains: no new requests, queued ones are finished (up to a timeout), then the thread ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

from fmlora.errors import FmloraError
from server.core.errors import EngineError, InferenceError, NotReadyError, QueueFullError, RequestTimeoutError

__all__ = ["BatchStats", "MicroBatcher"]

log = logging.getLogger("fmlora.server.core.batcher")

T = TypeVar("T")
R = TypeVar("R")

BatchFn = Callable[[Any, list[Any]], Sequence[Any]]


@dataclass(eq=False)
class _Request:
    key: Hashable
    items: list[Any]
    future: concurrent.futures.Future[list[Any]]
    enqueued: float
    deadline: float
    results: list[Any] = field(default_factory=list)
    next_index: int = 0  # items before this one are taken by a batch
    done_count: int = 0

    @property
    def waiting(self) -> int:
        return len(self.items) - self.next_index


@dataclass(frozen=True)
class BatchStats:
    queue_items: int = 0
    queue_requests: int = 0
    batches_total: int = 0
    items_total: int = 0
    requests_total: int = 0
    rejected_total: int = 0
    timeouts_total: int = 0
    errors_total: int = 0
    last_batch_size: int = 0
    last_batch_seconds: float = 0.0
    mean_batch_size: float = 0.0
    throughput_items_per_s: float = 0.0


def _settle(future: concurrent.futures.Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Complete ``future`` unless its caller cancelled it already (a timed-out or gone client)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: BatchFn,
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
        request_timeout_s: float = 30.0,
        name: str = "fmlora-inference",
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0 or request_timeout_s <= 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_s >= 0, request_timeout_s > 0")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self._name = name
        self._on_batch = on_batch
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._controls: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._queued_items = 0
        self._accepting = False
        self._stopping = False
        self._busy = False
        self._thread: threading.Thread | None = None
        # Counters (written by the inference thread, or under the lock).
        self._batches = 0
        self._items = 0
        self._requests = 0
        self._rejected = 0
        self._timeouts = 0
        self._errors = 0
        self._last_size = 0
        self._last_seconds = 0.0
        self._rate = 0.0  # EWMA of items per second of busy time

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("the batcher is already started")
            self._accepting = True
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def thread_ident(self) -> int | None:
        return None if self._thread is None else self._thread.ident

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Refuse new work, finish what is queued (up to ``timeout_s``), end the thread.

        Returns True when everything queued was finished; requests still waiting at the timeout fail
        with ``NotReadyError``.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
            while (self._queue or self._controls or self._busy) and self._thread is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            drained = not self._queue and not self._controls
            self._stopping = True
            leftovers = list(self._queue)
            controls = list(self._controls)
            self._queue.clear()
            self._controls.clear()
            self._queued_items = 0
            self._cond.notify_all()
        for req in leftovers:
            _settle(req.future, error=NotReadyError("the server is shutting down"))
        for _, future in controls:
            _settle(future, error=NotReadyError("the server is shutting down"))
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()) + 5.0)
        return drained

    # -- submitting ----------------------------------------------------------------------------
    def submit(self, key: Hashable, items: Sequence[T], timeout_s: float | None = None) -> concurrent.futures.Future:
        """Queue ``items`` under ``key``; the future resolves to one result per item, in order."""
        if not items:
            raise ValueError("a request needs at least one item")
        timeout = self.request_timeout_s if timeout_s is None else timeout_s
        now = time.monotonic()
        future: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()
        n = len(items)
        with self._cond:
            if not self._accepting:
                raise NotReadyError("the server is not accepting requests (starting or shutting down)")
            if self._queued_items > 0 and self._queued_items + n > self.max_queue:
                self._rejected += 1
                raise QueueFullError(
                    f"the request queue is full ({self._queued_items} images waiting); retry later",
                    retry_after=self._retry_after_locked(n),
                )
            req = _Request(key=key, items=list(items), future=future, enqueued=now, deadline=now + timeout)
            req.results = [None] * n
            self._queue.append(req)
            self._queued_items += n
            self._requests += 1
            self._cond.notify_all()
        # A weak reference: the future must not keep its request (and so its key, a version with its
        # merged weights) alive in a reference cycle until the garbage collector happens by.
        future.add_done_callback(partial(self._forget_if_cancelled, weakref.ref(req)))
        return future

    def _forget_if_cancelled(self, ref: weakref.ref[_Request], future: concurrent.futures.Future) -> None:
        """A caller that gave up frees its queue slots at once (not when the thread next looks)."""
        req = ref()
        if req is None or not future.cancelled():
            return
        with self._cond:
            if req in self._queue:
                self._queue.remove(req)
                self._queued_items -= req.waiting
                req.next_index = len(req.items)

    async def run(self, key: Hashable, items: Sequence[T], timeout_s: float | None = None) -> list[R]:
        """Submit and await the results on the current event loop."""
        timeout = self.request_timeout_s if timeout_s is None else timeout_s
        future = self.submit(key, items, timeout)
        wrapped = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(wrapped, timeout)
        except asyncio.TimeoutError:
            future.cancel()
            self._count_timeout()
            raise RequestTimeoutError(f"the request did not complete within {timeout:g} s") from None
        except asyncio.CancelledError:
            future.cancel()  # the caller went away: its images are skipped if not started
            raise

    def run_sync(self, key: Hashable, items: Sequence[T], timeout_s: float | None = None) -> list[R]:
        """Submit and block until the results are in (for threads without an event loop)."""
        timeout = self.request_timeout_s if timeout_s is None else timeout_s
        future = self.submit(key, items, timeout)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            self._count_timeout()
            raise RequestTimeoutError(f"the request did not complete within {timeout:g} s") from None

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` in the inference thread before the next batch; returns its future."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cond:
            if self._stopping or self._thread is None:
                raise NotReadyError("the inference thread is not running")
            self._controls.append((fn, future))
            self._cond.notify_all()
        return future

    def in_inference_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    # -- statistics ----------------------------------------------------------------------------
    def _count_timeout(self) -> None:
        with self._cond:
            self._timeouts += 1

    def _retry_after_locked(self, incoming: int) -> float:
        rate = self._rate if self._rate > 0 else self.max_batch_size / max(self.max_wait_s, 0.05)
        return float(min(60, max(1, math.ceil((self._queued_items + incoming) / rate))))

    @property
    def queue_items(self) -> int:
        return self._queued_items

    def stats(self) -> BatchStats:
        with self._cond:
            return BatchStats(
                queue_items=self._queued_items,
                queue_requests=len(self._queue),
                batches_total=self._batches,
                items_total=self._items,
                requests_total=self._requests,
                rejected_total=self._rejected,
                timeouts_total=self._timeouts,
                errors_total=self._errors,
                last_batch_size=self._last_size,
                last_batch_seconds=self._last_seconds,
                mean_batch_size=self._items / self._batches if self._batches else 0.0,
                throughput_items_per_s=self._rate,
            )

    # -- the inference thread ------------------------------------------------------------------
    def _drop_dead_locked(self, now: float) -> None:
        """Remove requests whose caller gave up or whose deadline passed; their items never run."""
        if not any(r.future.done() or r.deadline <= now for r in self._queue):
            return
        kept: deque[_Request] = deque()
        for req in self._queue:
            if req.future.done():  # cancelled by a timed-out or disconnected caller
                self._queued_items -= req.waiting
            elif req.deadline <= now:
                self._queued_items -= req.waiting
                self._timeouts += 1
                _settle(req.future, error=RequestTimeoutError("the request timed out waiting for the model"))
            else:
                kept.append(req)
        self._queue = kept

    def _take_batch_locked(self) -> tuple[Hashable, list[tuple[_Request, int, int]]]:
        key = self._queue[0].key
        parts: list[tuple[_Request, int, int]] = []
        room = self.max_batch_size
        for req in self._queue:
            if room == 0:
                break
            if req.key != key:
                continue
            take = min(room, req.waiting)
            parts.append((req, req.next_index, req.next_index + take))
            req.next_index += take
            room -= take
        taken = sum(end - start for _, start, end in parts)
        self._queued_items -= taken
        self._queue = deque(r for r in self._queue if r.waiting > 0)
        return key, parts

    def _next_work(self) -> tuple[str, Any] | None:
        """Block until there is a control job or a batch to run; None when the thread must end."""
        with self._cond:
            while True:
                if self._controls:
                    self._busy = True
                    return "control", self._controls.popleft()
                now = time.monotonic()
                self._drop_dead_locked(now)
                if not self._queue:
                    if self._stopping or not self._accepting:
                        if self._stopping:
                            return None
                        self._cond.notify_all()  # a drain waiting in stop() may proceed
                    self._cond.wait(0.5 if not self._stopping else 0.05)
                    continue
                head = self._queue[0]
                ready_at = head.enqueued + self.max_wait_s
                waiting = sum(r.waiting for r in self._queue if r.key == head.key)
                if waiting >= self.max_batch_size or now >= ready_at or not self._accepting:
                    self._busy = True
                    return "batch", self._take_batch_locked()
                self._cond.wait(min(ready_at - now, head.deadline - now))

    def _loop(self) -> None:
        while True:
            work = self._next_work()
            if work is None:
                return
            try:
                self._run_work(*work)
            except BaseException:  # never let the inference thread die
                log.exception("unexpected error in the inference thread")
            finally:
                # Nothing of the finished job stays referenced while the thread waits for the next.
                work = None
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _run_work(self, kind: str, payload: Any) -> None:
        if kind == "control":
            fn, future = payload
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
        else:
            self._execute(*payload)

    def _execute(self, key: Hashable, parts: list[tuple[_Request, int, int]]) -> None:
        # A request that failed on an earlier slice is not run again.
        parts = [p for p in parts if not p[0].future.done()]
        if not parts:
            return
        items = [item for req, start, end in parts for item in req.items[start:end]]
        started = time.perf_counter()
        try:
            outputs = self._call(key, items)
        except BaseException as exc:
            if len({id(p[0]) for p in parts}) > 1:
                # Isolate the offender: each request alone, so its neighbours still get answers.
                for part in parts:
                    self._execute_alone(key, part)
                self._record(len(items), time.perf_counter() - started)
                return
            self._fail(parts, exc)
            self._record(len(items), time.perf_counter() - started)
            return
        self._record(len(items), time.perf_counter() - started)
        self._deliver(parts, outputs)

    def _execute_alone(self, key: Hashable, part: tuple[_Request, int, int]) -> None:
        req, start, end = part
        try:
            outputs = self._call(key, req.items[start:end])
        except BaseException as exc:
            self._fail([part], exc)
            return
        self._deliver([part], outputs)

    def _call(self, key: Hashable, items: list[Any]) -> Sequence[Any]:
        outputs = self._run_batch(key, items)
        if outputs is None or len(outputs) != len(items):
            got = "None" if outputs is None else len(outputs)
            log.error("batch function returned %s results for %d inputs", got, len(items))
            raise InferenceError("the model returned a result that does not match its inputs")
        return outputs

    def _deliver(self, parts: list[tuple[_Request, int, int]], outputs: Sequence[Any]) -> None:
        offset = 0
        for req, start, end in parts:
            n = end - start
            req.results[start:end] = outputs[offset : offset + n]
            offset += n
            req.done_count += n
            if req.done_count == len(req.items):
                _settle(req.future, list(req.results))

    def _fail(self, parts: list[tuple[_Request, int, int]], exc: BaseException) -> None:
        if isinstance(exc, (EngineError, FmloraError)):
            error: BaseException = exc
        else:
            log.error("inference failed", exc_info=exc)
            error = InferenceError("inference failed")
        with self._cond:
            self._errors += len({id(p[0]) for p in parts})
        for req, _, _ in parts:
            _settle(req.future, error=error)

    def _record(self, size: int, seconds: float) -> None:
        with self._cond:
            self._batches += 1
            self._items += size
            self._last_size = size
            self._last_seconds = seconds
            if seconds > 0:
                rate = size / seconds
                self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        if self._on_batch is not None:
            try:
                self._on_batch(size, seconds)
            except Exception:
                log.exception("on_batch callback failed")
