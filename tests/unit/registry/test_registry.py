"""The registry's own guarantees on both backends: schema, live pointer, activation, retention,
leases, version numbers, recovery; and, on PostgreSQL, the change feed."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from fmlora.errors import (
    LeaseError,
    RegistryConfigError,
    RegistryError,
    TaskNotFoundError,
    VersionNotFoundError,
    VersionStateError,
)
from fmlora.model import FMLoRAModel
from fmlora.model.snapshot import save_snapshot
from fmlora.registry import WORKER_LEASE, Registry, migrations, notifications
from fmlora.registry.publish import publish_version
from tests.conftest import tiny_config
from tests.helpers import learn_quickly
from tests.integration.registry.services import registry_url  # noqa: F401 - fixture

SCHEMA = len(migrations.load("sqlite"))


@pytest.fixture
def registry(tmp_path: Path, registry_url: str | None) -> Registry:  # noqa: F811
    return Registry.open(tmp_path / "home", tiny_config(), registry_url=registry_url)


def publish(registry: Registry, model: FMLoRAModel, task: str, accepted: bool = True) -> int:
    learn_quickly(model, task, [f"{task}-a", f"{task}-b"], seed=len(model.tasks))
    card = {"accuracy": {task: 0.5}, "gate": {"reasons": [] if accepted else ["too low"]}}
    return publish_version(registry, model, card=card, parent=registry.live_version(), accepted=accepted).version


def test_sqlite_layout_wal_and_schema(tmp_path: Path) -> None:
    registry = Registry.open(tmp_path / "home", tiny_config())
    assert registry.db_path == registry.home / "registry.db" and registry.db_path.is_file()
    conn = sqlite3.connect(registry.db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert registry.schema_version == SCHEMA == len(migrations.load("postgresql"))
    conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, 'later')", (SCHEMA + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(RegistryError, match="newer than this fmlora"):
        Registry.open(registry.home)


def test_a_home_made_before_the_schema_table_is_upgraded(tmp_path: Path) -> None:
    """Homes of the first release: schema 1 counted in PRAGMA user_version, the config in model.json."""
    home = tmp_path / "old"
    home.mkdir()
    conn = sqlite3.connect(home / "registry.db")
    for statement in migrations.statements(migrations.load("sqlite")[0][2]):
        conn.execute(statement)
    conn.execute(
        "INSERT INTO tasks (id, name, kind, status, created_at, updated_at, classes, num_train, num_eval)"
        " VALUES ('t1', 'old', 'class', 'queued', 'x', 'x', '[\"a\"]', 1, 1)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    config = tiny_config(head_init_std=0.25)
    (home / "model.json").write_text(config.model_dump_json())
    registry = Registry.open(home)
    assert registry.schema_version == SCHEMA and registry.model_config == config
    task = registry.get_task("t1")
    assert task.name == "old" and task.archive_sha256 is None  # read from HOME/tasks/t1/, as before


def test_reopen_reads_config_and_refuses_another(registry: Registry, registry_url: str | None) -> None:  # noqa: F811
    again = Registry.open(registry.home, registry_url=registry_url)
    assert again.model_config == registry.model_config
    with pytest.raises(RegistryConfigError, match="another model configuration"):
        Registry.open(registry.home, tiny_config(head_init_std=0.5), registry_url=registry_url)


def test_publish_activate_and_state_transitions(registry: Registry, tiny_model: FMLoRAModel) -> None:
    assert registry.live_version() is None and registry.live() is None
    v1 = publish(registry, tiny_model, "one")
    v2 = publish(registry, tiny_model, "two")
    v3 = publish(registry, tiny_model, "three", accepted=False)
    assert (v1, v2, v3) == (1, 2, 3)
    assert registry.live_version() == 2
    assert registry.live() == registry.get_version(2)  # the live row, read in one statement
    assert [v.state for v in registry.list_versions()] == ["retired", "live", "rejected"]
    assert set(registry.get_version(1).objects) == {"adapter_model.safetensors", "adapter_config.json"}
    assert registry.get_version(1).objects["adapter_model.safetensors"] == registry.get_version(1).sha256
    with pytest.raises(VersionStateError, match="rejected"):
        registry.activate(3)
    for missing in (9, 0, -1, 2**63, 2**70):
        with pytest.raises(VersionNotFoundError):
            registry.activate(missing)
        with pytest.raises(VersionNotFoundError):
            registry.get_version(missing)
    assert registry.activate(1).state == "live"
    assert registry.live_version() == 1
    assert [v.state for v in registry.list_versions()] == ["live", "retired", "rejected"]
    kinds = [e.kind for e in registry.events()]
    assert kinds == ["published", "published", "rejected", "activated"]


def test_activate_refuses_a_version_whose_objects_are_gone(registry: Registry, tiny_model: FMLoRAModel) -> None:
    publish(registry, tiny_model, "one")
    publish(registry, tiny_model, "two")
    registry.store.delete("snapshots/v1/adapter_config.json")
    with pytest.raises(VersionStateError, match="missing"):
        registry.activate(1)
    assert registry.live_version() == 2


def test_prune_keeps_the_live_version(registry: Registry, tiny_model: FMLoRAModel) -> None:
    for name in ("a", "b", "c", "d"):
        publish(registry, tiny_model, name)
    registry.activate(1)
    pruned = registry.prune(keep=1)
    assert pruned == [3, 2]
    assert [v.version for v in registry.list_versions()] == [1, 4]
    assert not registry.snapshot_dir(2).exists() and registry.snapshot_dir(1).exists()
    assert registry.prune(keep=0) == [4]
    assert registry.live_version() == 1 and registry.snapshot_dir(1).exists()


def test_lease_is_exclusive_and_expires(registry: Registry) -> None:
    assert registry.lease_holder(WORKER_LEASE) is None
    assert registry.acquire_lease(WORKER_LEASE, "a", ttl_s=0.3)
    assert not registry.acquire_lease(WORKER_LEASE, "b", ttl_s=10)
    assert registry.lease_holder(WORKER_LEASE) == "a"
    with pytest.raises(LeaseError):
        registry.renew_lease(WORKER_LEASE, "b", 10)
    with pytest.raises(LeaseError):
        registry.claim_next_task("b")
    with pytest.raises(LeaseError):
        registry.reserve_version("b")
    time.sleep(0.4)
    assert registry.lease_holder(WORKER_LEASE) is None  # expired: nobody's, though the row is still there
    with pytest.raises(LeaseError):
        registry.renew_lease(WORKER_LEASE, "a", 10)
    assert registry.acquire_lease(WORKER_LEASE, "b", ttl_s=10)
    assert registry.lease(WORKER_LEASE).owner == "b"
    registry.release_lease(WORKER_LEASE, "b")
    assert registry.lease(WORKER_LEASE) is None


def test_racing_lease_takers_get_exactly_one_lease(registry: Registry) -> None:
    won: list[str] = []
    start = threading.Barrier(6)

    def take(owner: str) -> None:
        start.wait()
        if registry.acquire_lease(WORKER_LEASE, owner, ttl_s=30):
            won.append(owner)

    threads = [threading.Thread(target=take, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and registry.lease(WORKER_LEASE).owner == won[0]


def test_version_numbers_are_never_reused(registry: Registry, tiny_model: FMLoRAModel) -> None:
    assert registry.reserve_version() == 1  # a publish that died after reserving: number 1 is gone
    assert registry.next_version() == 2
    assert publish(registry, tiny_model, "one") == 2
    assert [v.version for v in registry.list_versions()] == [2]


def test_recover_removes_debris_and_requeues(registry: Registry, tiny_model: FMLoRAModel, tmp_path: Path) -> None:
    publish(registry, tiny_model, "one")
    learn_quickly(tiny_model, "two", ["x", "y"])
    save_snapshot(tiny_model, tmp_path / "v2")  # stored, never recorded: a crash before the commit
    registry.store.put_dir("snapshots/v2", tmp_path / "v2")
    registry.insert_task(
        task_id="t1", name="t", kind="class", classes=["q"], num_train=1, num_eval=1, idempotency_key=None
    )
    registry.acquire_lease(WORKER_LEASE, "w", 10)
    assert registry.claim_next_task("w").status == "training"
    actions = registry.recover()
    assert {o.key.split("/")[1] for o in registry.store.list("snapshots")} == {"v1"}
    assert any("unrecorded snapshot v2" in a for a in actions)
    task = registry.get_task("t1")
    assert task.status == "queued" and "retried" in task.error and task.attempts == 1
    assert registry.next_version() == 3  # v2's number was seen on disk before; it is not handed out again


def test_failed_after_max_attempts_and_missing_task(registry: Registry) -> None:
    registry.insert_task(
        task_id="t1", name="t", kind="class", classes=["q"], num_train=1, num_eval=1, idempotency_key=None
    )
    registry.acquire_lease(WORKER_LEASE, "w", 10)
    for _ in range(3):
        registry.claim_next_task("w")
        last = registry.fail_task("t1", "boom", retry=True)
    assert last.status == "failed" and last.attempts == 3
    with pytest.raises(TaskNotFoundError):
        registry.get_task("nope")


def test_postgres_notifies_publish_and_activate(
    registry: Registry,
    registry_url: str | None,  # noqa: F811
    tiny_model: FMLoRAModel,
) -> None:
    if registry_url is None:
        with pytest.raises(RegistryError, match="poll"):
            next(notifications(registry))
        return
    heard: list[dict] = []
    listening = threading.Event()

    def listen() -> None:
        for payload in notifications(registry, timeout_s=0.2):
            listening.set()
            if payload is not None:
                heard.append(payload)
            if len(heard) == 3:
                return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert listening.wait(10)
    publish(registry, tiny_model, "one")
    publish(registry, tiny_model, "two")
    registry.activate(1)
    thread.join(10)
    assert [(p["event"], p["version"]) for p in heard] == [("published", 1), ("published", 2), ("activated", 1)]
    assert heard[2]["previous"] == 2


def test_postgres_outage_is_reported_and_the_registry_resumes_by_itself(tmp_path: Path) -> None:
    from fmlora.errors import RegistryUnavailableError
    from tests.integration.registry.services import postgres_cluster

    cluster = postgres_cluster()
    name = cluster.create_database()
    try:
        registry = Registry.open(tmp_path / "home", tiny_config(), registry_url=cluster.url(name))
        registry.insert_task(
            task_id="t1", name="t", kind="class", classes=["q"], num_train=1, num_eval=1, idempotency_key=None
        )
        cluster.pause()
        try:
            started = time.monotonic()
            with pytest.raises(RegistryUnavailableError, match="cannot be reached"):
                registry.live_version()
            assert time.monotonic() - started < 15  # a bounded wait, never a hang
            with pytest.raises(RegistryUnavailableError):
                registry.acquire_lease(WORKER_LEASE, "w", 10)
        finally:
            cluster.start()
        # The pool drops its dead connections and reconnects: no restart of the process needed.
        deadline = time.monotonic() + 20
        while True:
            try:
                assert registry.get_task("t1").name == "t"
                break
            except RegistryUnavailableError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert registry.acquire_lease(WORKER_LEASE, "w", 10)
    finally:
        cluster.drop_database(name)
