"""The version cache (verify, stage, warm, evict, remember failures) and the registry watcher."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fmlora.errors import SnapshotCompatibilityError, VersionNotFoundError
from fmlora.model.snapshot import Snapshot, check_compatible
from server.core.errors import VersionUnavailableError
from server.core.versions import KnownBadVersionError, PreparedVersion, VersionCache, VersionEntry
from server.core.watcher import PollingSource
from tests.unit.server_core.conftest import Publisher, seeded_model


class FakeBackend:
    def __init__(self, publisher: Publisher) -> None:
        self.model = seeded_model(publisher.config)
        self.checked: list[int | None] = []
        self.warmed: list[int] = []
        self.warm_delay = 0.0
        self.fail_warm: Exception | None = None

    def check(self, snapshot: Snapshot) -> None:
        self.checked.append(snapshot.manifest.version)
        check_compatible(snapshot, self.model)

    def stage(self, snapshot: Snapshot) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in snapshot.tensors.items()}

    def prepare(self, entry: VersionEntry) -> PreparedVersion:
        time.sleep(self.warm_delay)
        if self.fail_warm is not None:
            raise self.fail_warm
        self.warmed.append(entry.version)
        return PreparedVersion()


@pytest.fixture
def backend(publisher: Publisher) -> FakeBackend:
    return FakeBackend(publisher)


def test_load_verifies_stages_and_warms_once(publisher, backend):
    v1 = publisher.learn_and_publish("animals", ["cat", "dog"])
    cache = VersionCache(publisher.registry, backend, capacity=2)
    entry = cache.load(v1)
    assert entry.version == v1 and entry.labels == ("cat", "dog") and entry.task_names == ("animals",)
    assert entry.sha256 == publisher.registry.get_version(v1).sha256 and entry.load_seconds > 0
    assert cache.load(v1) is entry and cache.get(v1) is entry
    assert backend.warmed == [v1] and cache.stats()["loads_total"] == 1


def test_concurrent_loads_of_one_version_share_the_work(publisher, backend):
    v1 = publisher.learn_and_publish("animals", ["cat", "dog"])
    backend.warm_delay = 0.1
    cache = VersionCache(publisher.registry, backend)
    results: list[VersionEntry] = []
    threads = [threading.Thread(target=lambda: results.append(cache.load(v1))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r is results[0] for r in results)
    assert backend.warmed == [v1]


def test_lru_eviction_spares_the_protected_version(publisher, backend):
    versions = [publisher.learn_and_publish(f"t{i}", [f"c{i}"]) for i in range(4)]
    cache = VersionCache(publisher.registry, backend, capacity=2)
    cache.load(versions[0])
    cache.protect(versions[0])
    for v in versions[1:]:
        cache.load(v)
    assert cache.cached_versions() == [versions[0], versions[3]]
    assert cache.stats()["evictions_total"] == 2


def test_registry_record_and_snapshot_must_agree(publisher, backend):
    v1 = publisher.learn_and_publish("animals", ["cat", "dog"])
    cache = VersionCache(publisher.registry, backend)
    with pytest.raises(VersionUnavailableError) as info:
        cache.load(v1, sha256="0" * 64)  # the registry recorded other tensors than those on disk
    assert isinstance(info.value.__cause__, Exception) and "registry recorded" in str(info.value.__cause__)
    with pytest.raises(VersionNotFoundError):
        cache.load(42)


def test_permanent_failures_are_remembered_until_forgotten(publisher, backend):
    publisher.learn("animals", ["cat", "dog"])
    v1 = publisher.publish(tamper=publisher.corrupt)
    cache = VersionCache(publisher.registry, backend)
    with pytest.raises(VersionUnavailableError):
        cache.load(v1)
    checked = len(backend.checked)
    with pytest.raises(KnownBadVersionError):  # refused from memory: no read, no check
        cache.load(v1)
    assert len(backend.checked) == checked and cache.stats()["loads_failed"] == 1
    failure = cache.failure(v1)
    assert failure is not None and failure.error_type == "ObjectIntegrityError" and failure.retry_at is None
    cache.forget_failure(v1)
    with pytest.raises(VersionUnavailableError) as info:
        cache.load(v1)
    assert not isinstance(info.value, KnownBadVersionError) and cache.stats()["loads_failed"] == 2


def test_transient_failures_back_off_then_retry(publisher, backend):
    v1 = publisher.learn_and_publish("animals", ["cat", "dog"])
    cache = VersionCache(publisher.registry, backend, retry_initial_s=0.1)
    backend.fail_warm = RuntimeError("CUDA out of memory")
    with pytest.raises(VersionUnavailableError):
        cache.load(v1)
    with pytest.raises(KnownBadVersionError):
        cache.load(v1)
    failure = cache.failure(v1)
    assert failure is not None and failure.retry_at is not None and failure.attempts == 1
    backend.fail_warm = None
    time.sleep(0.12)
    assert cache.load(v1).version == v1 and cache.failure(v1) is None


def test_incompatible_snapshot_is_refused(publisher, backend):
    v1 = publisher.learn_and_publish("animals", ["cat", "dog"])
    backend.model = seeded_model(publisher.config, seed=7)  # other backbone weights
    cache = VersionCache(publisher.registry, backend)
    with pytest.raises(VersionUnavailableError) as info:
        cache.load(v1)
    assert isinstance(info.value.__cause__, SnapshotCompatibilityError)
    assert cache.get(v1) is None and backend.warmed == []


def test_watcher_polls_applies_changes_and_survives_registry_errors():
    live = {"value": None}
    serving = {"value": None}
    applied: list[int] = []
    calls = {"n": 0}

    def poll() -> int | None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("database is locked")
        return live["value"]

    def apply(version: int) -> None:
        applied.append(version)
        serving["value"] = version

    watcher = PollingSource(poll, lambda: serving["value"], apply, poll_interval_s=0.01)
    watcher.start()
    try:
        live["value"] = 3
        deadline = time.monotonic() + 5
        while serving["value"] != 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert applied == [3]  # applied once, not on every poll
        live["value"] = 4
        assert watcher.check() == 4 and serving["value"] == 4
    finally:
        watcher.stop()
    assert not watcher.running and watcher.poll_errors_total == 1 and watcher.polls_total > 5


def test_a_poll_is_counted_only_once_its_read_has_ended():
    # Stats readers wait for polls_total to move and then read last_seen: the two must never disagree.
    reading, release = threading.Event(), threading.Event()

    def slow_poll() -> int:
        reading.set()
        release.wait(5)
        return 7

    watcher = PollingSource(slow_poll, lambda: 7, lambda live: None, poll_interval_s=60)
    checker = threading.Thread(target=watcher.check)
    checker.start()
    try:
        assert reading.wait(5)
        assert watcher.polls_total == 0 and watcher.last_seen is None  # the read is still under way
    finally:
        release.set()
        checker.join(5)
    assert watcher.polls_total == 1 and watcher.last_seen == 7
