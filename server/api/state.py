"""What the routes share, on ``app.state.fmlora``: settings, metrics, the registry and the engine."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from fmlora.errors import RegistryUnavailableError
from fmlora.registry.records import WORKER_LEASE
from fmlora.registry.registry import Registry, VersionInfo
from server.api.metrics import ScrapeState, ServerMetrics
from server.api.settings import Settings
from server.core.errors import NotReadyError
from server.core.protocol import ServedVersion, ServingEngine

__all__ = ["ServerState"]


@dataclass
class ServerState:
    settings: Settings
    metrics: ServerMetrics
    registry: Registry | None = None
    engine: ServingEngine | None = None  # built by the lifespan once the registry is open
    freeze_gc_at_start: bool = False
    started: bool = False
    stopping: bool = False
    startup_error: str | None = None
    start_task: asyncio.Task[None] | None = None
    _versions: OrderedDict[int, VersionInfo] = field(default_factory=OrderedDict)
    _versions_lock: threading.Lock = field(default_factory=threading.Lock)

    # -- readiness ---------------------------------------------------------------------------
    def is_ready(self) -> bool:
        return self.started and not self.stopping and self.engine is not None and self.engine.ready

    def ensure_ready(self) -> ServingEngine:
        """The engine, ready to predict; else NotReadyError (503) saying why not."""
        if self.is_ready():
            assert self.engine is not None
            return self.engine
        if self.startup_error is not None:
            raise NotReadyError("the inference engine failed to start; see the server log", retry_after=30)
        if self.stopping:
            raise NotReadyError("the server is shutting down")
        raise NotReadyError("the model is still loading; retry shortly")

    def serving(self) -> ServedVersion | None:
        """What this replica serves, or None while it is not ready (read once per response)."""
        return self.engine.serving if self.is_ready() and self.engine is not None else None

    def dependencies(self) -> dict[str, str]:
        """What the engine's registry watcher last saw (no database round trip on a probe)."""
        if self.engine is None or not self.started:
            return {}
        stats = self.engine.stats()
        return {
            "registry": "ok" if stats.get("registry_reachable", True) else "unreachable",
            "feed": str(stats.get("registry_feed", "polling")),
        }

    def live_version(self) -> int | None:
        """The registry's live version; when the database cannot be read, the last one the watcher saw."""
        if self.registry is None:
            return None
        try:
            return self.registry.live_version()
        except RegistryUnavailableError:
            if self.engine is None or not self.started:
                return None
            return self.engine.stats().get("registry_live_version")

    def training_worker(self) -> str | None:
        """The training lease's holder; None without a registry or while its database cannot be read."""
        if self.registry is None:
            return None
        try:
            return self.registry.lease_holder(WORKER_LEASE)
        except RegistryUnavailableError:
            return None

    def require_registry(self) -> Registry:
        if self.registry is None:
            raise NotReadyError("the registry is not open yet")
        return self.registry

    def backbone_name(self) -> str:
        return "" if self.registry is None else self.registry.model_config.backbone.name

    def version_info(self, version: int | None) -> VersionInfo | None:
        """Cached registry lookup: a version's card and size never change once published."""
        if version is None or self.registry is None:
            return None
        with self._versions_lock:
            info = self._versions.get(version)
        if info is None:
            try:
                info = self.registry.get_version(version)
            except Exception:
                return None
            with self._versions_lock:
                self._versions[version] = info
                while len(self._versions) > 32:
                    self._versions.popitem(last=False)
        return info

    def metrics_state(self) -> ScrapeState:
        """What /metrics reports at scrape time (called in a worker thread)."""
        engine = self.engine
        serving = self.serving()
        live = self.live_version()
        serving_info = self.version_info(None if serving is None else serving.version)
        live_info = self.version_info(live)
        info = None if engine is None else engine.describe()
        return ScrapeState(
            ready=self.is_ready(),
            backbone=self.backbone_name(),
            device=self.settings.device if info is None else info["device"],
            dtype=self.settings.dtype if info is None else info["dtype"],
            backend=self.settings.backend if info is None else info["backend"],
            stats=engine.stats() if engine is not None and self.started else None,
            live_version=live,
            serving_version=None if serving is None else serving.version,
            adapter_bytes=serving_info.adapter_bytes if serving_info is not None else 0,
            live_card=live_info.card if live_info is not None else {},
        )
