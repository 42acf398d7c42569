"""The task queue and the worker lease: the registry's half that the worker and intake write.

A mixin of ``Registry`` (it uses ``self.db``, ``self.store`` and ``self._event``); every method is
one transaction. The lease is a database row whose expiry is compared with the database's clock.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmlora.errors import LeaseError, TaskNotFoundError

from .records import ACTIVE_STATUSES, MAX_ATTEMPTS, WORKER_LEASE, Lease, TaskInfo, now_iso, task_from_row

if TYPE_CHECKING:
    from .database import Database, Tx
    from .store import ArtifactStore

__all__ = ["TASK_ARCHIVE_PREFIX", "TaskQueue", "task_archive_key"]

TASK_ARCHIVE_PREFIX = "tasks"
# An upload is stored before its row is inserted; an object without a row younger than this may be
# an upload in flight on another replica, so recovery leaves it alone.
_UNRECORDED_UPLOAD_AGE_S = 3600.0
_SNAPSHOT_KEY = re.compile(r"^snapshots/v(\d+)/")


def task_archive_key(task_id: str) -> str:
    return f"{TASK_ARCHIVE_PREFIX}/{task_id}.tar"


class TaskQueue:
    db: Database
    store: ArtifactStore
    home: Path
    scratch_dir: Path
    tasks_dir: Path

    @staticmethod
    def _event(tx: Tx, kind: str, task_id: str | None = None, version: int | None = None, **detail: Any) -> None:
        raise NotImplementedError

    # -- tasks ---------------------------------------------------------------------------------
    def get_task(self, task_id: str) -> TaskInfo:
        with self.db.read() as tx:
            row = tx.row("SELECT * FROM tasks WHERE id = ?", (task_id,))
        if row is None:
            raise TaskNotFoundError(f"task {task_id!r} does not exist")
        return task_from_row(row)

    def list_tasks(self, limit: int = 100, status: str | None = None) -> list[TaskInfo]:
        with self.db.read() as tx:
            if status is None:
                rows = tx.rows("SELECT * FROM tasks ORDER BY seq DESC LIMIT ?", (limit,))
            else:
                rows = tx.rows("SELECT * FROM tasks WHERE status = ? ORDER BY seq DESC LIMIT ?", (status, limit))
        return [task_from_row(r) for r in rows]

    def find_task(self, *, name: str | None = None, idempotency_key: str | None = None) -> TaskInfo | None:
        column, value = ("name", name) if name is not None else ("idempotency_key", idempotency_key)
        with self.db.read() as tx:
            row = tx.row(f"SELECT * FROM tasks WHERE {column} = ?", (value,))
        return None if row is None else task_from_row(row)

    def known_classes(self) -> dict[str, str]:
        """Every class of every task that can still become part of the model, with its task's name."""
        with self.db.read() as tx:
            rows = tx.rows("SELECT name, classes FROM tasks WHERE status NOT IN ('rejected', 'failed') ORDER BY seq")
        known: dict[str, str] = {}
        for row in rows:
            for cls in json.loads(row["classes"]):
                known.setdefault(cls, row["name"])
        return known

    def task_dir(self, task_id: str) -> Path:
        """Where a task stored before the artifact store existed was unpacked (HOME/tasks/<id>/)."""
        return self.tasks_dir / task_id

    def insert_task(
        self,
        *,
        task_id: str,
        name: str,
        kind: str,
        classes: list[str],
        num_train: int,
        num_eval: int,
        idempotency_key: str | None,
        archive_sha256: str | None = None,
        archive_bytes: int | None = None,
    ) -> TaskInfo:
        """Queue a task whose archive is already stored (see fmlora.registry.intake).

        Raises ``DuplicateKeyError`` when the name or the idempotency key is taken (on every backend).
        """
        now = now_iso()
        with self.db.write() as tx:
            tx.execute(
                "INSERT INTO tasks (id, name, kind, status, created_at, updated_at, classes, num_train, num_eval,"
                " idempotency_key, archive_sha256, archive_bytes) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    task_id,
                    name,
                    kind,
                    now,
                    now,
                    json.dumps(classes),
                    num_train,
                    num_eval,
                    idempotency_key,
                    archive_sha256,
                    archive_bytes,
                ),
            )
            self._event(tx, "submitted", task_id=task_id, name=name, task_kind=kind, classes=len(classes))
        return self.get_task(task_id)

    @staticmethod
    def _update_task(tx: Tx, task_id: str, **fields: Any) -> None:
        fields["updated_at"] = now_iso()
        for key in ("progress", "metrics"):
            if key in fields:
                fields[key] = json.dumps(fields[key])
        assignments = ", ".join(f"{k} = ?" for k in fields)
        tx.execute(f"UPDATE tasks SET {assignments} WHERE id = ?", (*fields.values(), task_id))

    # -- the worker lease ------------------------------------------------------------------------
    def _check_lease(self, tx: Tx, name: str, owner: str) -> None:
        row = tx.row(f"SELECT owner, expires, {self.db.now_sql} AS now FROM leases WHERE name = ?", (name,))
        if row is None or row["owner"] != owner or row["expires"] < row["now"]:
            raise LeaseError(f"worker {owner} no longer holds the {name!r} lease")

    def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take or renew lease ``name`` for ``owner`` unless someone else holds an unexpired one."""
        with self.db.write() as tx:
            now = float(tx.value(f"SELECT {self.db.now_sql}"))
            row = tx.row("SELECT owner, expires FROM leases WHERE name = ?", (name,))
            if row is not None and row["owner"] != owner and row["expires"] >= now:
                return False
            tx.execute(
                "INSERT INTO leases (name, owner, expires) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires = excluded.expires",
                (name, owner, now + ttl_s),
            )
            if row is None or row["owner"] != owner:
                self._event(
                    tx, "lease_acquired", owner=owner, lease=name, previous=None if row is None else row["owner"]
                )
        return True

    def renew_lease(self, name: str, owner: str, ttl_s: float) -> None:
        with self.db.write() as tx:
            self._check_lease(tx, name, owner)
            tx.execute(f"UPDATE leases SET expires = {self.db.now_sql} + ? WHERE name = ?", (ttl_s, name))

    def release_lease(self, name: str, owner: str) -> None:
        with self.db.write() as tx:
            tx.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))

    def lease(self, name: str) -> Lease | None:
        with self.db.read() as tx:
            row = tx.row("SELECT * FROM leases WHERE name = ?", (name,))
        return None if row is None else Lease(name=row["name"], owner=row["owner"], expires=row["expires"])

    def lease_holder(self, name: str) -> str | None:
        """Who holds lease ``name`` now (an expired lease counts as nobody's), on the database's clock."""
        with self.db.read() as tx:
            row = tx.row(f"SELECT owner FROM leases WHERE name = ? AND expires >= {self.db.now_sql}", (name,))
        return None if row is None else str(row["owner"])

    def claim_next_task(self, owner: str) -> TaskInfo | None:
        """Move the oldest queued task to 'training' for the holder of the worker lease."""
        with self.db.write() as tx:
            self._check_lease(tx, WORKER_LEASE, owner)
            row = tx.row("SELECT id, attempts FROM tasks WHERE status = 'queued' ORDER BY seq LIMIT 1")
            if row is None:
                return None
            attempt = row["attempts"] + 1
            self._update_task(tx, row["id"], status="training", attempts=attempt, error=None, progress={})
            self._event(tx, "claimed", task_id=row["id"], owner=owner, attempt=attempt)
        return self.get_task(row["id"])

    def update_task(self, task_id: str, owner: str, **fields: Any) -> None:
        """Progress/status updates from the lease holder; raises LeaseError once the lease is lost."""
        with self.db.write() as tx:
            self._check_lease(tx, WORKER_LEASE, owner)
            self._update_task(tx, task_id, **fields)

    def fail_task(self, task_id: str, error: str, *, retry: bool, owner: str | None = None) -> TaskInfo:
        """Requeue (``retry`` and attempts left) or fail a task, with a message for the submitter."""
        with self.db.write() as tx:
            if owner is not None:
                self._check_lease(tx, WORKER_LEASE, owner)
            row = tx.row("SELECT attempts FROM tasks WHERE id = ?", (task_id,))
            if row is None:
                raise TaskNotFoundError(f"task {task_id!r} does not exist")
            requeue = retry and row["attempts"] < MAX_ATTEMPTS
            self._update_task(tx, task_id, status="queued" if requeue else "failed", error=error)
            self._event(tx, "requeued" if requeue else "failed", task_id=task_id, error=error)
        return self.get_task(task_id)

    def recover(self) -> list[str]:
        """Clean up after a dead worker; call only while holding the worker lease.

        Tasks it left mid-training are queued again (or failed after MAX_ATTEMPTS), and stored
        snapshot objects without a version row (it died between storing and committing) are deleted,
        so nothing partial or unrecorded stays visible; so are old task uploads that never got a row.
        """
        from .store import FileStore

        actions: list[str] = []
        with self.db.read() as tx:
            placeholders = ", ".join("?" for _ in ACTIVE_STATUSES)
            stale = [
                r["id"] for r in tx.rows(f"SELECT id FROM tasks WHERE status IN ({placeholders})", ACTIVE_STATUSES)
            ]
            recorded = {r["version"] for r in tx.rows("SELECT version FROM versions")}
            task_ids = {r["id"] for r in tx.rows("SELECT id FROM tasks")}
        for task_id in stale:
            self.fail_task(task_id, "the worker stopped while training this task; it was retried", retry=True)
            actions.append(f"requeued task {task_id}")
        if isinstance(self.store, FileStore):
            actions += [f"removed staging {name}" for name in self.store.remove_debris("snapshots", 0.0)]
            actions += [
                f"removed staging {name}" for name in self.store.remove_debris("tasks", _UNRECORDED_UPLOAD_AGE_S)
            ]
        unrecorded = sorted(
            {int(m.group(1)) for o in self.store.list("snapshots") if (m := _SNAPSHOT_KEY.match(o.key))} - recorded
        )
        if unrecorded:
            with self.db.write() as tx:  # a number that was written once is never handed out again
                high = int(tx.value("SELECT value FROM meta WHERE key = 'version_high'") or 0)
                tx.execute("UPDATE meta SET value = ? WHERE key = 'version_high'", (str(max(high, *unrecorded)),))
        for version in unrecorded:
            self.store.delete_prefix(f"snapshots/v{version}")
            actions.append(f"removed unrecorded snapshot v{version}")
        cutoff = time.time() - _UNRECORDED_UPLOAD_AGE_S
        for path in self.scratch_dir.iterdir() if self.scratch_dir.is_dir() else []:
            # Staging of this host's publishes (only the lease holder publishes: the dead one's) and
            # uploads (an hour old means its writer is gone).
            if path.name.startswith(".publish-") or path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                actions.append(f"removed scratch {path.name}")
        for obj in self.store.list(TASK_ARCHIVE_PREFIX):
            task_id = obj.key[len(TASK_ARCHIVE_PREFIX) + 1 :].removesuffix(".tar")
            if obj.key.endswith(".tar") and task_id not in task_ids and obj.modified < cutoff:
                self.store.delete(obj.key)
                actions.append(f"removed unrecorded upload {obj.key}")
        return actions
