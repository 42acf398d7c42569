"""Prometheus metrics, on a per-app ``CollectorRegistry`` (never the global one), so several apps in
one process (tests, embedders) do not collide.

Request metrics are observed by the request-context middleware (labelled by route *template*, so ids
in paths never explode cardinality); engine and registry state is read at scrape time by a collector,
so counters such as swaps include everything the engine did, even before the app subscribed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypedDict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from fmlora._version import __version__
from server.core.protocol import EngineStats

__all__ = ["CONTENT_TYPE", "ScrapeState", "ServerMetrics"]

log = logging.getLogger("fmlora.server")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SWAP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A stage of a swap on a small adapter takes from well under a millisecond (the flip) to tens of ms.
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ScrapeState(TypedDict):
    """Engine and registry state, read at every scrape."""

    ready: bool
    backbone: str
    device: str
    dtype: str
    backend: str
    stats: EngineStats | None  # None before the engine has started
    live_version: int | None
    serving_version: int | None
    adapter_bytes: int
    live_card: dict[str, Any]


class _StateCollector(Collector):
    """Reads engine stats and the registry's live version at scrape time."""

    def __init__(self, state: Callable[[], ScrapeState]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        try:
            s: ScrapeState | None = self._state()
        except Exception:  # a scrape must never fail because the engine or registry is unwell
            log.exception("collecting server state for /metrics failed")
            s = None
        ready = GaugeMetricFamily("fmlora_ready", "1 when this replica is ready to serve predictions.")
        ready.add_metric([], 1.0 if s is not None and s["ready"] else 0.0)
        yield ready
        if s is None:
            return
        info = InfoMetricFamily("fmlora_build", "Library version, backbone, device, dtype and backend.")
        build = {key: s[key] for key in ("backbone", "device", "dtype", "backend")}  # type: ignore[literal-required]
        info.add_metric([], {**build, "version": __version__})
        yield info
        stats = s["stats"]
        depth = GaugeMetricFamily("fmlora_queue_depth", "Images waiting for the model.")
        depth.add_metric([], 0.0 if stats is None else float(stats["queue_depth"]))
        yield depth
        swaps = CounterMetricFamily("fmlora_swaps", "Versions this replica swapped in (rollbacks included).")
        swaps.add_metric([], 0.0 if stats is None else float(stats["swaps_total"]))
        yield swaps
        failed = CounterMetricFamily("fmlora_swaps_failed", "Swaps refused: the snapshot failed to load or verify.")
        failed.add_metric([], 0.0 if stats is None else float(stats["swaps_failed"]))
        yield failed
        for name, value, doc in (
            ("fmlora_live_version", s["live_version"], "The registry's live version (-1 if none)."),
            ("fmlora_serving_version", s["serving_version"], "The version this replica serves (-1 if none)."),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], -1.0 if value is None else float(value))
            yield gauge
        since = stats.get("serving_since") if stats is not None else None
        if since is not None:
            gauge = GaugeMetricFamily(
                "fmlora_serving_since_timestamp_seconds", "When this replica swapped to the version it serves."
            )
            gauge.add_metric([], float(since))
            yield gauge
        adapter = GaugeMetricFamily("fmlora_adapter_bytes", "Adapter tensor bytes of the served version.")
        adapter.add_metric([], float(s["adapter_bytes"]))
        yield adapter
        card = s["live_card"]
        per_task = GaugeMetricFamily(
            "fmlora_task_accuracy", "Held-out accuracy per task of the live version (its card).", labels=["task"]
        )
        accuracy = card.get("accuracy") if isinstance(card.get("accuracy"), dict) else {}
        for task, value in accuracy.items():
            if isinstance(value, (int, float)):
                per_task.add_metric([str(task)], float(value))
        yield per_task
        for name, key, doc in (
            ("fmlora_live_final_accuracy", "final_accuracy", "Accuracy over all classes of the live version."),
            (
                "fmlora_live_average_incremental_accuracy",
                "average_incremental_accuracy",
                "Average incremental accuracy of the live version.",
            ),
            ("fmlora_live_forgetting", "forgetting", "Mean forgetting of earlier tasks in the live version."),
        ):
            value = card.get(key)
            if isinstance(value, (int, float)):
                gauge = GaugeMetricFamily(name, doc)
                gauge.add_metric([], float(value))
                yield gauge


class ServerMetrics:
    """All metrics of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fmlora_http_requests",
            "HTTP requests by route template and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "fmlora_http_request_duration_seconds",
            "HTTP request latency by route template and status.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("fmlora_http_requests_in_flight", "HTTP requests being handled.", registry=r)
        self.images = Counter("fmlora_predicted_images", "Images classified.", registry=r)
        self.batch_size = Histogram(
            "fmlora_batch_size", "Images per model forward pass.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "fmlora_batch_duration_seconds", "Model time per batch.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.swap_seconds = Histogram(
            "fmlora_swap_duration_seconds",
            "Time to load, verify and warm up a version before swapping to it.",
            ["outcome"],
            buckets=SWAP_BUCKETS,
            registry=r,
        )
        self.swap_stage_seconds = Histogram(
            "fmlora_swap_stage_duration_seconds",
            "Time per stage of a swap, from reading the registry to the flip (server.core.stages).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.tasks_submitted = Counter(
            "fmlora_tasks_submitted", "Task uploads accepted (replays of an idempotency key excluded).", registry=r
        )

    def watch(self, state: Callable[[], ScrapeState]) -> None:
        """Report engine and registry state, read from ``state()`` at every scrape."""
        self.registry.register(_StateCollector(state))

    # -- hooks ---------------------------------------------------------------------------------
    def request_started(self) -> None:
        self.in_flight.inc()

    def request_finished(self, method: str, route: str, status: int, seconds: float) -> None:
        self.in_flight.dec()
        # The method is client-chosen text: unknown ones share one label, or any client could add series.
        labels = (method if method in HTTP_METHODS else "OTHER", route, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def on_swap(self, ok: bool, seconds: float, version: int | None = None) -> None:
        self.swap_seconds.labels("ok" if ok else "failed").observe(seconds)

    def on_swap_stages(self, stages: Mapping[str, float]) -> None:
        for stage, seconds in stages.items():
            self.swap_stage_seconds.labels(stage).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
