"""The registry's own guarantees: schema, live pointer, activation, retention, leases, recovery."""

from __future__ import annotations

import sqlite3
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
from fmlora.registry.publish import publish_version
from fmlora.registry.registry import MIGRATIONS, WORKER_LEASE, Registry
from tests.conftest import tiny_config
from tests.helpers import learn_quickly


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry.open(tmp_path / "home", tiny_config())


def publish(registry: Registry, model: FMLoRAModel, task: str, accepted: bool = True) -> int:
    learn_quickly(model, task, [f"{task}-a", f"{task}-b"], seed=len(model.tasks))
    card = {"accuracy": {task: 0.5}, "gate": {"reasons": [] if accepted else ["too low"]}}
    return publish_version(registry, model, card=card, parent=registry.live_version(), accepted=accepted).version


def test_layout_wal_and_schema(registry: Registry) -> None:
    assert (registry.home / "registry.db").is_file() and (registry.home / "model.json").is_file()
    conn = sqlite3.connect(registry.db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert registry.schema_version == len(MIGRATIONS)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(RegistryError, match="newer than this fmlora"):
        Registry.open(registry.home)


def test_reopen_reads_config_and_refuses_another(registry: Registry) -> None:
    assert Registry.open(registry.home).model_config == registry.model_config
    other = tiny_config(head_init_std=0.5)
    with pytest.raises(RegistryConfigError, match="another model configuration"):
        Registry.open(registry.home, other)


def test_publish_activate_and_state_transitions(registry: Registry, tiny_model: FMLoRAModel) -> None:
    assert registry.live_version() is None and registry.live() is None
    v1 = publish(registry, tiny_model, "one")
    v2 = publish(registry, tiny_model, "two")
    v3 = publish(registry, tiny_model, "three", accepted=False)
    assert (v1, v2, v3) == (1, 2, 3)
    assert registry.live_version() == 2
    assert [v.state for v in registry.list_versions()] == ["retired", "live", "rejected"]
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
    assert registry.acquire_lease(WORKER_LEASE, "a", ttl_s=0.3)
    assert not registry.acquire_lease(WORKER_LEASE, "b", ttl_s=10)
    with pytest.raises(LeaseError):
        registry.renew_lease(WORKER_LEASE, "b", 10)
    with pytest.raises(LeaseError):
        registry.claim_next_task("b")
    time.sleep(0.4)
    with pytest.raises(LeaseError):
        registry.renew_lease(WORKER_LEASE, "a", 10)
    assert registry.acquire_lease(WORKER_LEASE, "b", ttl_s=10)
    assert registry.lease(WORKER_LEASE).owner == "b"
    registry.release_lease(WORKER_LEASE, "b")
    assert registry.lease(WORKER_LEASE) is None


def test_recover_removes_debris_and_requeues(registry: Registry, tiny_model: FMLoRAModel) -> None:
    publish(registry, tiny_model, "one")
    learn_quickly(tiny_model, "two", ["x", "y"])
    save_snapshot(tiny_model, registry.snapshot_dir(2))  # written, never recorded: a crash before commit
    (registry.snapshots_dir / ".v3.abc.tmp").mkdir()  # a crash mid-write
    registry.insert_task(
        task_id="t1", name="t", kind="class", classes=["q"], num_train=1, num_eval=1, idempotency_key=None
    )
    registry.acquire_lease(WORKER_LEASE, "w", 10)
    assert registry.claim_next_task("w").status == "training"
    actions = registry.recover()
    assert sorted(p.name for p in registry.snapshots_dir.iterdir()) == ["v1"]
    assert any("unrecorded snapshot v2" in a for a in actions)
    task = registry.get_task("t1")
    assert task.status == "queued" and "retried" in task.error and task.attempts == 1
    assert registry.next_version() == 2


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
