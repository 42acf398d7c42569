"""The registry watcher: polls the live pointer and asks the engine to load-verify-warm-swap.

One thread calls ``check()`` every ``poll_interval_s``; an admin reload calls ``check()`` directly
(serialised with the thread by a lock). ``check`` reads the live version (one SQLite read), and when
it differs from what is serving, hands it to ``apply`` (the engine's swap). Failures are the cache's
business to remember: a version that failed is refused cheaply (``KnownBadVersionError``) until its
backoff ends or an admin reload forgets it, so a bad snapshot is never retried in a tight loop. A
registry that cannot be read is logged (rate-limited) and the current version keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["RegistryWatcher"]

log = logging.getLogger("fmlora.server.core.watcher")


class RegistryWatcher:
    def __init__(
        self,
        poll: Callable[[], int | None],
        current: Callable[[], int | None],
        apply: Callable[[int], None],
        poll_interval_s: float = 0.5,
        *,
        name: str = "fmlora-watcher",
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be positive")
        self._poll = poll
        self._current = current
        self._apply = apply
        self.poll_interval_s = poll_interval_s
        self._name = name
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls_total = 0
        self.poll_errors_total = 0
        self.last_seen: int | None = None
        self._last_error_log = 0.0

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the watcher is already started")
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.check()
            except Exception:  # the loop must survive anything; check() logs what it knows
                log.exception("registry watcher check failed")

    def check(self) -> int | None:
        """Poll once and swap if the live version changed; returns the live version seen."""
        with self._lock:
            self.polls_total += 1
            try:
                live = self._poll()
            except Exception as exc:
                self.poll_errors_total += 1
                now = time.monotonic()
                if now - self._last_error_log > 30:
                    self._last_error_log = now
                    log.warning("cannot read the registry's live version (%s); still serving the current one", exc)
                return self.last_seen
            self.last_seen = live
            if live is None or live == self._current():
                return live
            self._apply(live)
            return live
