"""The version cache: verified, staged and prepared snapshots of the last K versions.

Loading a version is: read the snapshot (sha256 of exactly the bytes parsed, format), check it
against the registry's record and the resident model (``check_compatible``), stage its small tensors
on the serving device and dtype, then let the backend prepare it (``VersionBackend.prepare``: merged
weights, a probe batch that must give finite outputs of the right shape). All of it runs in the
thread that asked for the version (the watcher, or a loader for a pinned request), never in the
inference thread. Only then does it enter the cache, and only an entry from the cache is ever
served; the inference thread switches to it by rebinding references between two batches. So a
swap, pinning a cached version or rolling back to one costs the requests nothing but that rebinding.

A version that fails is refused, logged and counted, and remembered by (version, sha256): a
permanently bad snapshot (corrupt, truncated, incompatible, non-finite outputs) is not tried again
until an explicit ``forget_failure``; a transient failure (missing directory on a lagging volume,
out of memory) is retried with exponential backoff, never in a tight loop.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Protocol, TypedDict

import torch

from fmlora.errors import (
    ObjectIntegrityError,
    RegistryUnavailableError,
    SnapshotError,
    SnapshotFormatError,
    SnapshotIntegrityError,
    StoreUnavailableError,
)
from fmlora.model.config import ModelConfig
from fmlora.model.model import TaskRecord
from fmlora.model.snapshot import Snapshot, SnapshotManifest, read_snapshot
from server.core.errors import VersionUnavailableError
from server.core.stages import timed

__all__ = [
    "CacheStats",
    "KnownBadVersionError",
    "LoadFailure",
    "PreparedVersion",
    "RegistryView",
    "SnapshotWarmupError",
    "VersionBackend",
    "VersionCache",
    "VersionEntry",
]

log = logging.getLogger("fmlora.server.core.versions")

MAX_REMEMBERED_FAILURES = 1000


class SnapshotWarmupError(SnapshotError):
    """The snapshot loaded but failed its warm-up (non-finite or mis-shaped outputs)."""


class KnownBadVersionError(VersionUnavailableError):
    """The version failed before and is not retried yet (see ``VersionCache.failures``)."""


class RegistryView(Protocol):
    """What the serving core reads from the registry (``fmlora.registry.Registry`` fits)."""

    @property
    def model_config(self) -> ModelConfig: ...

    def live_version(self) -> int | None: ...

    def live(self) -> _RecordedVersion | None:
        """The live version's row (one read: what the version source looks at)."""
        ...

    def get_version(self, version: int) -> _RecordedVersion: ...

    def list_versions(self) -> Sequence[_RecordedVersion]: ...

    def fetch_version(self, version: int, info: _RecordedVersion | None = None) -> Path:
        """A local directory with the version's objects, verified against the registry (fetched from
        the artifact store into this host's cache when the store is remote). ``info``: the version's
        row when the caller has just read it, so it is not read again."""
        ...


class _RecordedVersion(Protocol):
    @property
    def version(self) -> int: ...

    @property
    def sha256(self) -> str: ...

    @property
    def state(self) -> str: ...


class PreparedVersion:
    """What a backend built for one version off the inference thread (merged weights, feeds, ...)."""


@dataclass(frozen=True, eq=False)
class VersionEntry:
    """One verified version, ready to serve. Compared by identity: it is the batcher's key."""

    version: int
    sha256: str
    manifest: SnapshotManifest
    tensors: Mapping[str, torch.Tensor]  # staged on the serving device and dtype
    labels: tuple[str, ...]
    label_tasks: tuple[str, ...]
    tasks: tuple[TaskRecord, ...]
    path: Path
    prepared: PreparedVersion | None = None  # set by the backend's prepare before the entry is cached
    load_seconds: float = 0.0
    loaded_at: float = field(default_factory=time.time)

    @cached_property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def adapter_bytes(self) -> int:
        return self.manifest.adapter_bytes

    def __repr__(self) -> str:
        return f"VersionEntry(version={self.version}, sha256={self.sha256[:12]}…, classes={len(self.labels)})"


class VersionBackend(Protocol):
    """What the cache needs from the engine (the resident model)."""

    def check(self, snapshot: Snapshot) -> None:
        """Raise unless the snapshot fits the resident model (check_compatible)."""

    def stage(self, snapshot: Snapshot) -> dict[str, torch.Tensor]:
        """The snapshot's tensors on the serving device and dtype."""

    def prepare(self, entry: VersionEntry) -> PreparedVersion:
        """What activating ``entry`` needs, built and checked on a probe batch in the calling thread
        (never the inference thread); raises ``SnapshotWarmupError`` if the outputs are bad."""


class CacheStats(TypedDict):
    cached_versions: list[int]
    capacity: int
    loads_total: int
    loads_failed: int
    evictions_total: int
    hits: int
    misses: int
    last_load_seconds: float | None
    failed_versions: dict[int, dict[str, str | int | bool]]


@dataclass
class LoadFailure:
    version: int
    sha256: str | None
    error_type: str
    message: str
    at: float
    attempts: int
    retry_at: float | None  # None: permanent until forgotten

    def blocks(self, sha256: str | None, now: float) -> bool:
        if sha256 is not None and self.sha256 is not None and sha256 != self.sha256:
            return False  # a different snapshot under the same number: try it
        return self.retry_at is None or now < self.retry_at


class VersionCache:
    def __init__(
        self,
        registry: RegistryView,
        backend: VersionBackend,
        capacity: int = 4,
        *,
        retry_initial_s: float = 5.0,
        retry_max_s: float = 300.0,
    ) -> None:
        if capacity < 1:
            raise ValueError("the version cache needs room for at least one version")
        self.registry = registry
        self.backend = backend
        self.capacity = capacity
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, VersionEntry] = OrderedDict()
        self._inflight: dict[int, concurrent.futures.Future[VersionEntry]] = {}
        self._failures: dict[int, LoadFailure] = {}
        self._protected: int | None = None
        self.loads_total = 0
        self.loads_failed = 0
        self.evictions_total = 0
        self.hits = 0
        self.misses = 0
        self.last_load_seconds: float | None = None

    # -- lookups -------------------------------------------------------------------------------
    def get(self, version: int) -> VersionEntry | None:
        with self._lock:
            entry = self._entries.get(version)
            if entry is not None:
                self._entries.move_to_end(version)
                self.hits += 1
            return entry

    def cached_versions(self) -> list[int]:
        with self._lock:
            return sorted(self._entries)

    def failures(self) -> list[LoadFailure]:
        with self._lock:
            return sorted(self._failures.values(), key=lambda f: f.version)

    def failure(self, version: int) -> LoadFailure | None:
        with self._lock:
            return self._failures.get(version)

    def forget_failure(self, version: int) -> None:
        with self._lock:
            self._failures.pop(version, None)

    def protect(self, version: int | None) -> None:
        """Never evict ``version`` (the one serving by default)."""
        with self._lock:
            self._protected = version

    # -- loading -------------------------------------------------------------------------------
    def load(self, version: int, sha256: str | None = None, *, info: _RecordedVersion | None = None) -> VersionEntry:
        """The verified entry for ``version`` (from the cache, or loaded, verified and warmed now).

        ``sha256``: the tensor hash the registry recorded for the version; ``info``: its registry row
        (either is looked up when not given). Raises the registry's ``VersionNotFoundError``,
        ``KnownBadVersionError`` for a version that failed before, or ``VersionUnavailableError``
        when loading fails now.
        """
        if info is not None and info.version != version:
            raise ValueError(f"the registry row given for version {version} is version {info.version}'s")
        if sha256 is None:
            if info is None:
                with timed("registry"):
                    info = self.registry.get_version(version)
            sha256 = info.sha256
        with self._lock:
            entry = self._entries.get(version)
            if entry is not None and entry.sha256 == sha256:
                self._entries.move_to_end(version)
                self.hits += 1
                return entry
            failure = self._failures.get(version)
            if failure is not None and failure.blocks(sha256, time.monotonic()):
                raise KnownBadVersionError(
                    f"version {version} cannot be served: its snapshot failed to load ({failure.error_type})"
                )
            pending = self._inflight.get(version)
            owner = pending is None
            if owner:
                pending = concurrent.futures.Future()
                self._inflight[version] = pending
                self.misses += 1
        assert pending is not None
        if not owner:
            return pending.result()
        try:
            entry = self._load_now(version, sha256, info)
        except BaseException as exc:
            with self._lock:
                self._inflight.pop(version, None)
            pending.set_exception(exc)
            raise
        with self._lock:
            self._inflight.pop(version, None)
        pending.set_result(entry)
        return entry

    def _load_now(self, version: int, sha256: str, info: _RecordedVersion | None) -> VersionEntry:
        started = time.perf_counter()
        path = Path(f"v{version}")  # named in messages until the store has said where it is
        try:
            row = info if info is not None and info.sha256 == sha256 else None  # else the store reads it
            with timed("fetch"):
                path = Path(self.registry.fetch_version(version, row))
            if not path.is_dir():
                raise FileNotFoundError(f"snapshot directory {path} does not exist")
            with timed("read"):
                snapshot = read_snapshot(path)
            manifest = snapshot.manifest
            if manifest.tensors_sha256 != sha256:
                raise SnapshotIntegrityError(
                    f"snapshot {path} holds tensors {manifest.tensors_sha256[:12]}…, "
                    f"the registry recorded {sha256[:12]}… for version {version}"
                )
            if manifest.version is not None and manifest.version != version:
                raise SnapshotFormatError(f"snapshot {path} says it is version {manifest.version}, not {version}")
            with timed("check"):
                self.backend.check(snapshot)
            with timed("stage"):
                tensors = self.backend.stage(snapshot)
            entry = VersionEntry(
                version=version,
                sha256=sha256,
                manifest=manifest,
                tensors=tensors,
                labels=tuple(manifest.labels),
                label_tasks=tuple(manifest.label_tasks),
                tasks=tuple(manifest.tasks),
                path=path,
            )
            with timed("prepare"):
                entry = replace(entry, prepared=self.backend.prepare(entry))
        except BaseException as exc:
            # A dependency that is down says nothing about the snapshot: try again at the next look.
            if not isinstance(exc, (RegistryUnavailableError, StoreUnavailableError)):
                self._record_failure(version, sha256, exc)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise VersionUnavailableError(
                f"version {version} cannot be served: its snapshot failed to load ({type(exc).__name__})"
            ) from exc
        seconds = time.perf_counter() - started
        entry = replace(entry, load_seconds=seconds)
        with self._lock:
            self._entries[version] = entry
            self._entries.move_to_end(version)
            self._failures.pop(version, None)
            self.loads_total += 1
            self.last_load_seconds = seconds
            self._evict_locked()
        log.info("version %d loaded, verified and prepared in %.3f s", version, seconds)
        return entry

    def _record_failure(self, version: int, sha256: str | None, exc: BaseException) -> None:
        # Stored bytes that do not match the registry's sha256 will not match later either.
        permanent = isinstance(exc, (SnapshotError, ObjectIntegrityError))
        with self._lock:
            previous = self._failures.get(version)
            attempts = 1 if previous is None or previous.sha256 != sha256 else previous.attempts + 1
            retry_at = None
            if not permanent:
                backoff = min(self.retry_max_s, self.retry_initial_s * 2 ** (attempts - 1))
                retry_at = time.monotonic() + backoff
            self._failures[version] = LoadFailure(
                version=version,
                sha256=sha256,
                error_type=type(exc).__name__,
                message=str(exc)[:500],
                at=time.time(),
                attempts=attempts,
                retry_at=retry_at,
            )
            self.loads_failed += 1
            while len(self._failures) > MAX_REMEMBERED_FAILURES:  # bounded memory under a storm
                oldest = min(self._failures.values(), key=lambda f: f.at)
                del self._failures[oldest.version]
        log.warning(
            "refused version %d (%s): %s%s",
            version,
            type(exc).__name__,
            exc,
            "" if permanent else f"; will retry after backoff (attempt {attempts})",
        )

    def _evict_locked(self) -> None:
        while len(self._entries) > self.capacity:
            victim = next((v for v in self._entries if v != self._protected), None)
            if victim is None:
                return
            del self._entries[victim]
            self.evictions_total += 1
            log.info("evicted version %d from the version cache", victim)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                cached_versions=sorted(self._entries),
                capacity=self.capacity,
                loads_total=self.loads_total,
                loads_failed=self.loads_failed,
                evictions_total=self.evictions_total,
                hits=self.hits,
                misses=self.misses,
                last_load_seconds=self.last_load_seconds,
                failed_versions={
                    f.version: {"error": f.error_type, "attempts": f.attempts, "permanent": f.retry_at is None}
                    for f in self._failures.values()
                },
            )
