"""Version sources: what tells the engine that another version went live.

A ``VersionSource`` reads the registry's live pointer (``read_live``) and, when it differs from what
is serving (``current``), hands it to ``apply`` (the engine's load-verify-prepare-swap). ``read_live``
returns the live version's number or its registry row (anything with a ``version``); ``apply`` gets
what it returned, so the engine's swap does not read the row a second time. ``check()``
does that once, now (an admin reload calls it); ``start()`` runs a thread that calls ``check()``
whenever the source's ``_watch`` loop says to. ``PollingSource`` checks every ``poll_interval_s``;
another source (e.g. one woken by database notifications) subclasses ``VersionSource`` and
implements ``_watch`` alone. ``NotifySource`` is that one: it wakes on the registry's change feed
(PostgreSQL LISTEN/NOTIFY) and keeps polling as the fallback, since a notification sent while its
connection was down is lost.

Failures are the version cache's business to remember: a version that failed is refused cheaply
(``KnownBadVersionError``) until its backoff ends or an admin reload forgets it, so a bad snapshot is
never retried in a tight loop. A registry that cannot be read is logged (rate-limited) and the
current version keeps serving; ``registry_reachable`` says whether the last read worked (what
``/readyz`` reports as a degraded dependency).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from server.core.stages import measuring, timed

__all__ = ["Live", "NotifySource", "PollingSource", "VersionSource"]

log = logging.getLogger("fmlora.server.core.watcher")


class _Row(Protocol):
    @property
    def version(self) -> int: ...


Live = int | _Row  # what read_live returns when a version is live, and apply receives


def version_of(live: Live | None) -> int | None:
    return live if live is None or isinstance(live, int) else live.version


class VersionSource:
    def __init__(
        self,
        read_live: Callable[[], Live | None],
        current: Callable[[], int | None],
        apply: Callable[[Any], object],
        *,
        name: str = "fmlora-watcher",
    ) -> None:
        self._read_live = read_live
        self._current = current
        self._apply = apply
        self._name = name
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls_total = 0
        self.poll_errors_total = 0
        self.last_seen: int | None = None
        self._last_error_log = 0.0
        self.registry_error: str | None = None  # the error type of the last failed read; None after a good one
        self.unreachable_since: float | None = None  # time.monotonic() of the first failed read in a row

    @property
    def registry_reachable(self) -> bool:
        return self.registry_error is None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the version source is already started")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._watch(self._stop)
        except Exception:  # a source that dies leaves the version serving; say so loudly
            log.exception("the version source %s stopped", self._name)

    def _watch(self, stop: threading.Event) -> None:
        """Call ``self.check_safely()`` whenever the live version may have changed, until ``stop``."""
        raise NotImplementedError

    def check_safely(self) -> None:
        try:
            self.check()
        except Exception:  # the watch loop must survive anything; check() logs what it knows
            log.exception("checking the live version failed")

    def check(self) -> int | None:
        """Read the live version once and swap if it changed; returns the live version seen."""
        # One clock for the read and the swap it may start: the engine reports the stages of both.
        with self._lock, measuring():
            try:
                with timed("registry"):
                    live = self._read_live()
            except Exception as exc:
                # Counted once the read has ended, so a reader of the stats never sees a poll without its result.
                self.polls_total += 1
                self.poll_errors_total += 1
                now = time.monotonic()
                self.registry_error = type(exc).__name__
                if self.unreachable_since is None:
                    self.unreachable_since = now
                if now - self._last_error_log > 30:
                    self._last_error_log = now
                    log.warning("cannot read the registry's live version (%s); still serving the current one", exc)
                return self.last_seen
            if self.registry_error is not None:
                log.info("the registry answers again (%s before)", self.registry_error)
            self.registry_error = self.unreachable_since = None
            version = self.last_seen = version_of(live)
            self.polls_total += 1
            if version is not None and version != self._current():
                self._apply(live)
            return version


class PollingSource(VersionSource):
    """Checks the live pointer every ``poll_interval_s`` (one SQLite read)."""

    def __init__(
        self,
        read_live: Callable[[], Live | None],
        current: Callable[[], int | None],
        apply: Callable[[Any], object],
        poll_interval_s: float = 0.5,
        *,
        name: str = "fmlora-watcher",
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be positive")
        super().__init__(read_live, current, apply, name=name)
        self.poll_interval_s = poll_interval_s

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(self.poll_interval_s):
            self.check_safely()


class NotifySource(VersionSource):
    """Wakes on the registry's change feed (``listen(timeout_s)``: payloads as versions change, None
    every ``timeout_s`` without one) and still polls every ``poll_interval_s``: a notification sent
    while the listening connection was down is lost, and a poll finds what it said. When the feed
    fails (the database restarts, a proxy drops the connection) the source polls alone and reconnects
    every ``reconnect_s``; after a reconnect it checks at once."""

    def __init__(
        self,
        read_live: Callable[[], Live | None],
        current: Callable[[], int | None],
        apply: Callable[[Any], object],
        listen: Callable[[float], Iterable[dict[str, Any] | None]],
        poll_interval_s: float = 0.5,
        *,
        reconnect_s: float = 1.0,
        name: str = "fmlora-watcher",
    ) -> None:
        if poll_interval_s <= 0 or reconnect_s <= 0:
            raise ValueError("poll_interval_s and reconnect_s must be positive")
        super().__init__(read_live, current, apply, name=name)
        self._listen = listen
        self.poll_interval_s = poll_interval_s
        self.reconnect_s = reconnect_s
        self.listening = False
        self.notifications_total = 0
        self.feed_errors_total = 0
        self._last_feed_log = 0.0

    def _watch(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._follow_feed(stop)
            except Exception as exc:
                self.feed_errors_total += 1
                now = time.monotonic()
                if now - self._last_feed_log > 30:
                    self._last_feed_log = now
                    log.warning("the registry's change feed is down (%s); polling until it is back", exc)
            self.listening = False
            # Poll alone until the next reconnect attempt.
            retry_at = time.monotonic() + self.reconnect_s
            while not stop.is_set() and time.monotonic() < retry_at:
                self.check_safely()
                stop.wait(min(self.poll_interval_s, max(0.0, retry_at - time.monotonic())))

    def _follow_feed(self, stop: threading.Event) -> None:
        timeout = min(self.poll_interval_s, 1.0)
        feed = iter(self._listen(timeout))
        try:
            next_poll = 0.0  # check once the feed is up: what changed while it was down
            first = True
            for payload in feed:
                if first:
                    first = False
                    self.listening = True
                if stop.is_set():
                    return
                if payload is not None:
                    self.notifications_total += 1
                if payload is not None or time.monotonic() >= next_poll:
                    self.check_safely()
                    next_poll = time.monotonic() + self.poll_interval_s
        finally:
            close = getattr(feed, "close", None)
            if close is not None:
                close()
