"""Measuring when replicas serve a version, without slowing them down: the helpers of
``benchmarks.replicas``.

The measurement must not compete with what it measures. Run inside the benchmark's own process,
moto's S3 server and the load clients shared one GIL with the publisher's clock and the poller: an
S3 GET waited on client threads, the poller opened a new HTTP client (and TLS context) per look, and
the publisher stamped a commit up to ~100 ms after the replicas had heard of it. So here moto and the
load each run in a process of their own, the poller keeps one connection per replica, and a commit is
timed by the same PostgreSQL NOTIFY the replicas wait for.

- ``MotoProcess``: moto's S3 server as a child process (``python -m moto.server``).
- ``LoadProcess``: one client thread per replica, POSTing back to back, in a child process; its
  answers (replica, time.monotonic(), status, version) come back when it stops. CLOCK_MONOTONIC is
  one clock for every process on the machine.
- ``CommitClock``: LISTENs on the registry's change feed; ``heard(version, since)`` is when the
  NOTIFY of the commit that made ``version`` live arrived (a bound on the commit just after it).
- ``Pollers``: one thread and one keep-alive connection per replica; ``first_seen(version)`` polls
  GET /readyz every 5 ms and gives, per replica, when it first answered with ``version``.
- ``serving_since``: a replica's own record of when it swapped (``/metrics``), wall clock.
- ``stage_means``: the mean seconds per swap stage over the replicas' histograms.
"""

from __future__ import annotations

import multiprocessing
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx

from benchmarks.processes import child_env, free_port, scrape_metrics
from tests.integration.registry.services import MotoS3

__all__ = ["CommitClock", "LoadProcess", "MotoProcess", "Pollers", "serving_since", "stage_means"]

Answer = tuple[int, float, int, int | None]  # (replica, time.monotonic(), HTTP status, model_version)


class MotoProcess(MotoS3):
    """moto's S3 server on a free loopback port, in a child process (``options``/``create_bucket``
    as ``MotoS3``); ``stop()`` ends it."""

    def __init__(self, start_timeout_s: float = 60.0) -> None:
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        # werkzeug logs every request on stderr: nobody reads it, and a full pipe would stall moto.
        self.proc = subprocess.Popen(command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto's S3 server did not start on port {port}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _load_main(urls: Sequence[str], body: bytes, stop: Any, started: Any, answers: Any) -> None:
    got: list[Answer] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(timeout=30.0) as http:
            while not stop.is_set():
                try:
                    r = http.post(urls[index] + "/predict", content=body, headers={"content-type": "application/json"})
                    version = r.json().get("model_version") if r.status_code == 200 else None
                    answer = (index, time.monotonic(), r.status_code, version)
                except httpx.HTTPError:
                    answer = (index, time.monotonic(), 0, None)
                with lock:
                    got.append(answer)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(urls))]
    for t in threads:
        t.start()
    started.set()
    for t in threads:
        t.join()
    answers.put(got)


class LoadProcess:
    """The load clients in a child process (see the module docstring); ``answers`` after the block."""

    def __init__(self, urls: Sequence[str], body: bytes) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop, self._started = ctx.Event(), ctx.Event()
        self._answers = ctx.Queue()
        args = (list(urls), body, self._stop, self._started, self._answers)
        self._proc = ctx.Process(target=_load_main, args=args, daemon=True)
        self.answers: list[Answer] = []

    def __enter__(self) -> LoadProcess:
        self._proc.start()
        # A spawned child imports the benchmark's main module first: seconds, with torch.
        if not self._started.wait(120):
            self._proc.kill()
            raise RuntimeError("the load process did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        try:
            self.answers = list(self._answers.get(timeout=120))
        finally:
            self._proc.join(30)
            if self._proc.is_alive():
                self._proc.kill()


class CommitClock:
    """When this process heard each NOTIFY of the registry's change feed (time.monotonic())."""

    def __init__(self, registry: Any) -> None:
        from fmlora.registry.feed import notifications

        self._notes: list[tuple[float, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listening = threading.Event()

        def listen() -> None:
            for payload in notifications(registry, 0.2):
                self._listening.set()
                if payload is not None:
                    with self._lock:
                        self._notes.append((time.monotonic(), payload))
                if self._stop.is_set():
                    return

        self._thread = threading.Thread(target=listen, name="commit-clock", daemon=True)
        self._thread.start()
        if not self._listening.wait(30):
            raise RuntimeError("the benchmark cannot listen to the registry's change feed")

    def heard(self, version: int, since: float, wait_s: float = 2.0) -> float | None:
        """When the NOTIFY that made ``version`` live (sent after ``since``) arrived; None if it did not."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock:
                for at, payload in self._notes:
                    if at >= since and payload.get("live") == version:
                        return at
            if time.monotonic() > deadline:
                return None
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


class Pollers:
    """One keep-alive HTTP connection per replica, polled from one thread each."""

    def __init__(self, urls: Sequence[str], interval_s: float = 0.005) -> None:
        self.urls = list(urls)
        self.interval_s = interval_s
        self._clients = [httpx.Client(base_url=u, timeout=5.0) for u in self.urls]

    def _serving(self, index: int) -> int | None:
        try:
            return self._clients[index].get("/readyz").json().get("serving_version")
        except (httpx.HTTPError, ValueError):
            return None

    def first_seen(self, version: int, timeout_s: float) -> list[float | None]:
        """Per replica, time.monotonic() when GET /readyz first said ``version`` (None: not in time)."""
        seen: list[float | None] = [None] * len(self.urls)
        deadline = time.monotonic() + timeout_s

        def poll(index: int) -> None:
            while time.monotonic() < deadline:
                if self._serving(index) == version:
                    seen[index] = time.monotonic()
                    return
                time.sleep(self.interval_s)

        threads = [threading.Thread(target=poll, args=(i,), daemon=True) for i in range(len(self.urls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return seen

    def close(self) -> None:
        for client in self._clients:
            client.close()


def serving_since(url: str, version: int) -> float | None:
    """When the replica at ``url`` swapped to ``version`` (time.time()), if it serves it now."""
    metrics = scrape_metrics(url)
    if metrics.get("fmlora_serving_version") != float(version):
        return None
    return metrics.get("fmlora_serving_since_timestamp_seconds")


def stage_means(urls: Sequence[str]) -> dict[str, Any]:
    """Mean milliseconds per swap stage over every swap of the replicas at ``urls`` (their histograms)."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    prefix = "fmlora_swap_stage_duration_seconds"
    for url in urls:
        for name, value in scrape_metrics(url).items():
            if not name.startswith(prefix) or 'stage="' not in name:
                continue
            stage = name.split('stage="', 1)[1].split('"', 1)[0]
            if name.startswith(prefix + "_sum"):
                sums[stage] = sums.get(stage, 0.0) + value
            elif name.startswith(prefix + "_count"):
                counts[stage] = counts.get(stage, 0.0) + value
    return {
        stage: {"swaps": int(counts[stage]), "mean_ms": round(1000 * sums.get(stage, 0.0) / counts[stage], 3)}
        for stage in sorted(counts)
        if counts[stage]
    }
