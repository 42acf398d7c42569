"""The registry: tasks, versions, the live pointer and an event log in one directory (FMLORA_HOME).

    HOME/registry.db        SQLite in WAL mode (many readers across processes, one writer at a time)
    HOME/model.json         the model configuration every snapshot in this home is made for
    HOME/tasks/<id>/        a validated upload: train/<class>/*, eval/<class>/*, task.json
    HOME/snapshots/v<N>/    published snapshots, immutable

Every state change is one SQLite transaction; files are made visible by rename before (snapshots,
tasks) the row that points at them is committed, and anything on disk without a row is debris from a
crash that ``recover()`` removes.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from fmlora.errors import (
    LeaseError,
    RegistryConfigError,
    RegistryError,
    TaskNotFoundError,
    VersionNotFoundError,
    VersionStateError,
)
from fmlora.model.config import ModelConfig

__all__ = ["TASK_STATUSES", "VERSION_STATES", "Event", "Lease", "Registry", "TaskInfo", "VersionInfo"]

TaskStatus = Literal["queued", "training", "evaluating", "published", "live", "rejected", "failed"]
VersionState = Literal["candidate", "live", "rejected", "retired"]
TASK_STATUSES: tuple[str, ...] = ("queued", "training", "evaluating", "published", "live", "rejected", "failed")
VERSION_STATES: tuple[str, ...] = ("candidate", "live", "rejected", "retired")
ACTIVE_STATUSES = ("training", "evaluating")

# Each entry upgrades the schema by one version; never edit a shipped entry, append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE tasks (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL CHECK (kind IN ('class', 'domain')),
        status TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        progress TEXT NOT NULL DEFAULT '{}',
        metrics TEXT NOT NULL DEFAULT '{}',
        version INTEGER,
        error TEXT,
        classes TEXT NOT NULL,
        num_train INTEGER NOT NULL,
        num_eval INTEGER NOT NULL,
        idempotency_key TEXT UNIQUE,
        attempts INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX tasks_status ON tasks (status, seq);
    CREATE TABLE versions (
        version INTEGER PRIMARY KEY,
        parent INTEGER,
        sha256 TEXT NOT NULL,
        state TEXT NOT NULL,
        tasks TEXT NOT NULL,
        card TEXT NOT NULL,
        created_at TEXT NOT NULL,
        adapter_bytes INTEGER NOT NULL,
        task_id TEXT
    );
    CREATE TABLE leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        kind TEXT NOT NULL,
        task_id TEXT,
        version INTEGER,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    INSERT INTO meta (key, value) VALUES ('live_version', ''), ('live_changes', '0');
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
MAX_ATTEMPTS = 3


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True)


class TaskInfo(_Row):
    id: str
    name: str
    kind: Literal["class", "domain"]
    status: TaskStatus
    created_at: str
    updated_at: str
    progress: dict[str, Any]
    metrics: dict[str, Any]
    version: int | None
    error: str | None
    classes: list[str]
    num_train: int
    num_eval: int
    attempts: int


class VersionInfo(_Row):
    version: int
    parent: int | None
    sha256: str
    state: VersionState
    tasks: list[str]
    card: dict[str, Any]
    created_at: str
    adapter_bytes: int
    task_id: str | None


class Event(_Row):
    id: int
    at: str
    kind: str
    task_id: str | None
    version: int | None
    detail: dict[str, Any]


class Lease(_Row):
    name: str
    owner: str
    expires: float


def _task(row: sqlite3.Row) -> TaskInfo:
    return TaskInfo(
        id=row["id"],
        name=row["name"],
        kind=row["kind"],
        status=row["status"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        progress=json.loads(row["progress"]),
        metrics=json.loads(row["metrics"]),
        version=row["version"],
        error=row["error"],
        classes=json.loads(row["classes"]),
        num_train=row["num_train"],
        num_eval=row["num_eval"],
        attempts=row["attempts"],
    )


def _version(row: sqlite3.Row) -> VersionInfo:
    return VersionInfo(
        version=row["version"],
        parent=row["parent"],
        sha256=row["sha256"],
        state=row["state"],
        tasks=json.loads(row["tasks"]),
        card=json.loads(row["card"]),
        created_at=row["created_at"],
        adapter_bytes=row["adapter_bytes"],
        task_id=row["task_id"],
    )


class Registry:
    """Handle on one FMLORA_HOME. Cheap to create; safe to use from many threads and processes."""

    def __init__(self, home: Path, model_config: ModelConfig):
        self.home = home
        self.model_config = model_config
        self.db_path = home / "registry.db"
        self.tasks_dir = home / "tasks"
        self.snapshots_dir = home / "snapshots"

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, home: str | Path, model_config: ModelConfig | None = None) -> Registry:
        """Open (creating if needed) the registry in ``home``.

        The first open records ``model_config`` (default: ``ModelConfig()``); later opens must pass
        the same configuration or none, since every snapshot in a home is made for one model.
        """
        home = Path(home).expanduser().resolve()
        try:
            for sub in ("", "tasks", "snapshots"):
                (home / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create the registry directory {home}: {exc}") from exc
        stored = cls._stored_config(home, model_config)
        registry = cls(home, stored)
        registry._migrate()
        return registry

    @staticmethod
    def _stored_config(home: Path, given: ModelConfig | None) -> ModelConfig:
        path = home / "model.json"
        if not path.exists():
            config = given or ModelConfig()
            tmp = path.with_name(f".model.json.{uuid.uuid4().hex}.tmp")
            tmp.write_text(config.model_dump_json(indent=2), encoding="utf-8")
            try:
                # link() fails if another process created it meanwhile: first writer wins.
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        try:
            stored = ModelConfig.model_validate_json(path.read_bytes())
        except (ValidationError, ValueError, OSError) as exc:
            raise RegistryConfigError(f"{path} is not a valid model configuration: {exc}") from exc
        if given is not None and given != stored:
            raise RegistryConfigError(
                f"{home} was created for another model configuration (see {path}); "
                "use a new home for a different backbone or adapter layout"
            )
        return stored

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE serialises writers across processes."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise RegistryError(f"registry database error: {exc}") from exc
        finally:
            conn.close()

    def _migrate(self) -> None:
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current > SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                raise RegistryError(
                    f"{self.db_path} has schema {current}, newer than this fmlora ({SCHEMA_VERSION}); upgrade fmlora"
                )
            for number in range(current, SCHEMA_VERSION):
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open the registry database {self.db_path}: {exc}") from exc
        finally:
            conn.close()

    @property
    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    # -- events ----------------------------------------------------------------------------------
    @staticmethod
    def _event(
        conn: sqlite3.Connection, kind: str, task_id: str | None = None, version: int | None = None, **detail: Any
    ) -> None:
        conn.execute(
            "INSERT INTO events (at, kind, task_id, version, detail) VALUES (?, ?, ?, ?, ?)",
            (_now(), kind, task_id, version, json.dumps(detail)),
        )

    def events(self, since: int = 0, limit: int = 1000) -> list[Event]:
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (since, limit)).fetchall()
        return [
            Event(
                id=r["id"],
                at=r["at"],
                kind=r["kind"],
                task_id=r["task_id"],
                version=r["version"],
                detail=json.loads(r["detail"]),
            )
            for r in rows
        ]

    # -- versions and the live pointer -------------------------------------------------------------
    @staticmethod
    def _live(conn: sqlite3.Connection) -> int | None:
        value = conn.execute("SELECT value FROM meta WHERE key = 'live_version'").fetchone()[0]
        return int(value) if value else None

    def live_version(self) -> int | None:
        with self._read() as conn:
            return self._live(conn)

    def live(self) -> VersionInfo | None:
        with self._read() as conn:
            live = self._live(conn)
            if live is None:
                return None
            return _version(conn.execute("SELECT * FROM versions WHERE version = ?", (live,)).fetchone())

    @staticmethod
    def _check_number(version: int) -> None:
        # SQLite integers are 64-bit: a larger number cannot exist, and must not become an overflow.
        if not 0 < version < 2**63:
            raise VersionNotFoundError(f"version {version} does not exist")

    def get_version(self, version: int) -> VersionInfo:
        self._check_number(version)
        with self._read() as conn:
            row = conn.execute("SELECT * FROM versions WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise VersionNotFoundError(f"version {version} does not exist")
        return _version(row)

    def list_versions(self) -> list[VersionInfo]:
        with self._read() as conn:
            return [_version(r) for r in conn.execute("SELECT * FROM versions ORDER BY version")]

    def snapshot_dir(self, version: int) -> Path:
        return self.snapshots_dir / f"v{version}"

    def next_version(self) -> int:
        """The number the next snapshot gets: above every row and every directory (crash debris too)."""
        with self._read() as conn:
            highest = conn.execute("SELECT COALESCE(MAX(version), 0) FROM versions").fetchone()[0]
        on_disk = [int(p.name[1:]) for p in self.snapshots_dir.glob("v*") if p.name[1:].isdigit()]
        return max([highest, *on_disk]) + 1

    @staticmethod
    def _set_live(conn: sqlite3.Connection, version: int) -> None:
        conn.execute("UPDATE versions SET state = 'retired' WHERE state = 'live' AND version != ?", (version,))
        conn.execute("UPDATE versions SET state = 'live' WHERE version = ?", (version,))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'live_version'", (str(version),))
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'live_changes'")

    def activate(self, version: int) -> VersionInfo:
        """Make a published version live (rollback or roll forward)."""
        self._check_number(version)
        with self._write() as conn:
            row = conn.execute("SELECT * FROM versions WHERE version = ?", (version,)).fetchone()
            if row is None:
                raise VersionNotFoundError(f"version {version} does not exist")
            if row["state"] not in ("live", "retired"):
                raise VersionStateError(
                    f"version {version} is {row['state']}; only published versions (live or retired) can be activated"
                )
            if not (self.snapshot_dir(version) / "adapter_config.json").is_file():
                raise VersionStateError(f"version {version}'s snapshot files are missing from {self.snapshots_dir}")
            previous = self._live(conn)
            self._set_live(conn, version)
            self._event(conn, "activated", version=version, previous=previous)
        return self.get_version(version)

    def record_version(
        self,
        *,
        version: int,
        parent: int | None,
        sha256: str,
        tasks: list[str],
        card: dict[str, Any],
        adapter_bytes: int,
        task_id: str | None,
        accepted: bool,
        lease_owner: str | None = None,
    ) -> VersionInfo:
        """Record a snapshot already on disk: live when ``accepted``, else rejected (kept with its card).

        With ``lease_owner`` the write happens only while that owner still holds the worker lease,
        so a worker that stalled past its lease cannot publish over its successor.
        """
        if not (self.snapshot_dir(version) / "adapter_config.json").is_file():
            raise RegistryError(f"snapshot v{version} is not on disk; publish the files before recording them")
        with self._write() as conn:
            if lease_owner is not None:
                self._check_lease(conn, WORKER_LEASE, lease_owner)
            conn.execute(
                "INSERT INTO versions (version, parent, sha256, state, tasks, card, created_at, adapter_bytes, task_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    version,
                    parent,
                    sha256,
                    "candidate" if accepted else "rejected",
                    json.dumps(tasks),
                    json.dumps(card),
                    _now(),
                    adapter_bytes,
                    task_id,
                ),
            )
            if accepted:
                self._set_live(conn, version)
            if task_id is not None:
                conn.execute(
                    "UPDATE tasks SET status = ?, version = ?, metrics = ?, error = ?, updated_at = ? WHERE id = ?",
                    (
                        "live" if accepted else "rejected",
                        version,
                        json.dumps(card),
                        None if accepted else "; ".join(card.get("gate", {}).get("reasons", [])) or "rejected",
                        _now(),
                        task_id,
                    ),
                )
            self._event(conn, "published" if accepted else "rejected", task_id=task_id, version=version)
        return self.get_version(version)

    def prune(self, keep: int) -> list[int]:
        """Delete all but the ``keep`` newest non-live versions (rejected ones included); never the live one."""
        if keep < 0:
            raise RegistryError("keep must be >= 0")
        with self._write() as conn:
            live = self._live(conn)
            rows = conn.execute("SELECT version FROM versions WHERE version IS NOT ? ORDER BY version DESC", (live,))
            doomed = [r["version"] for r in rows][keep:]
            for version in doomed:
                conn.execute("DELETE FROM versions WHERE version = ?", (version,))
                self._event(conn, "pruned", version=version)
        for version in doomed:
            self.remove_snapshot_dir(self.snapshot_dir(version))
        return doomed

    def remove_snapshot_dir(self, path: Path) -> None:
        """Delete an unrecorded or pruned snapshot directory."""
        # Rename first so readers never see a half-deleted snapshot, then delete at leisure.
        if not path.exists():
            return
        doomed = path.with_name(f".{path.name}.{uuid.uuid4().hex}.deleting")
        try:
            os.rename(path, doomed)
        except OSError:
            return
        shutil.rmtree(doomed, ignore_errors=True)

    # -- tasks ---------------------------------------------------------------------------------
    def get_task(self, task_id: str) -> TaskInfo:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise TaskNotFoundError(f"task {task_id!r} does not exist")
        return _task(row)

    def list_tasks(self, limit: int = 100, status: str | None = None) -> list[TaskInfo]:
        with self._read() as conn:
            if status is None:
                rows = conn.execute("SELECT * FROM tasks ORDER BY seq DESC LIMIT ?", (limit,))
            else:
                rows = conn.execute("SELECT * FROM tasks WHERE status = ? ORDER BY seq DESC LIMIT ?", (status, limit))
            return [_task(r) for r in rows]

    def find_task(self, *, name: str | None = None, idempotency_key: str | None = None) -> TaskInfo | None:
        column, value = ("name", name) if name is not None else ("idempotency_key", idempotency_key)
        with self._read() as conn:
            row = conn.execute(f"SELECT * FROM tasks WHERE {column} = ?", (value,)).fetchone()
        return None if row is None else _task(row)

    def known_classes(self) -> dict[str, str]:
        """Every class of every task that can still become part of the model, with its task's name."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT name, classes FROM tasks WHERE status NOT IN ('rejected', 'failed') ORDER BY seq"
            ).fetchall()
        known: dict[str, str] = {}
        for row in rows:
            for cls in json.loads(row["classes"]):
                known.setdefault(cls, row["name"])
        return known

    def task_dir(self, task_id: str) -> Path:
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
    ) -> TaskInfo:
        """Queue a task whose files are already in ``task_dir(task_id)`` (see fmlora.registry.intake)."""
        now = _now()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO tasks (id, name, kind, status, created_at, updated_at, classes, num_train, num_eval,"
                " idempotency_key) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                (task_id, name, kind, now, now, json.dumps(classes), num_train, num_eval, idempotency_key),
            )
            self._event(conn, "submitted", task_id=task_id, name=name, task_kind=kind, classes=len(classes))
        return self.get_task(task_id)

    def _update_task(self, conn: sqlite3.Connection, task_id: str, **fields: Any) -> None:
        fields["updated_at"] = _now()
        for key in ("progress", "metrics"):
            if key in fields:
                fields[key] = json.dumps(fields[key])
        assignments = ", ".join(f"{k} = ?" for k in fields)
        conn.execute(f"UPDATE tasks SET {assignments} WHERE id = ?", (*fields.values(), task_id))

    # -- the worker lease ------------------------------------------------------------------------
    @staticmethod
    def _check_lease(conn: sqlite3.Connection, name: str, owner: str) -> None:
        row = conn.execute("SELECT owner, expires FROM leases WHERE name = ?", (name,)).fetchone()
        if row is None or row["owner"] != owner or row["expires"] < time.time():
            raise LeaseError(f"worker {owner} no longer holds the {name!r} lease")

    def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take or renew lease ``name`` for ``owner`` unless someone else holds an unexpired one."""
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT owner, expires FROM leases WHERE name = ?", (name,)).fetchone()
            if row is not None and row["owner"] != owner and row["expires"] >= now:
                return False
            conn.execute(
                "INSERT INTO leases (name, owner, expires) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires = excluded.expires",
                (name, owner, now + ttl_s),
            )
            if row is None or row["owner"] != owner:
                self._event(conn, "lease_acquired", owner=owner, lease=name)
        return True

    def renew_lease(self, name: str, owner: str, ttl_s: float) -> None:
        with self._write() as conn:
            self._check_lease(conn, name, owner)
            conn.execute("UPDATE leases SET expires = ? WHERE name = ?", (time.time() + ttl_s, name))

    def release_lease(self, name: str, owner: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))

    def lease(self, name: str) -> Lease | None:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM leases WHERE name = ?", (name,)).fetchone()
        return None if row is None else Lease(name=row["name"], owner=row["owner"], expires=row["expires"])

    def claim_next_task(self, owner: str) -> TaskInfo | None:
        """Move the oldest queued task to 'training' for the holder of the worker lease."""
        with self._write() as conn:
            self._check_lease(conn, WORKER_LEASE, owner)
            row = conn.execute("SELECT * FROM tasks WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            self._update_task(conn, row["id"], status="training", attempts=row["attempts"] + 1, error=None, progress={})
            self._event(conn, "claimed", task_id=row["id"], owner=owner, attempt=row["attempts"] + 1)
        return self.get_task(row["id"])

    def update_task(self, task_id: str, owner: str, **fields: Any) -> None:
        """Progress/status updates from the lease holder; raises LeaseError once the lease is lost."""
        with self._write() as conn:
            self._check_lease(conn, WORKER_LEASE, owner)
            self._update_task(conn, task_id, **fields)

    def fail_task(self, task_id: str, error: str, *, retry: bool, owner: str | None = None) -> TaskInfo:
        """Requeue (``retry`` and attempts left) or fail a task, with a message for the submitter."""
        with self._write() as conn:
            if owner is not None:
                self._check_lease(conn, WORKER_LEASE, owner)
            row = conn.execute("SELECT attempts FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                raise TaskNotFoundError(f"task {task_id!r} does not exist")
            requeue = retry and row["attempts"] < MAX_ATTEMPTS
            self._update_task(conn, task_id, status="queued" if requeue else "failed", error=error)
            self._event(conn, "requeued" if requeue else "failed", task_id=task_id, error=error)
        return self.get_task(task_id)

    def recover(self) -> list[str]:
        """Clean up after a dead worker; call only while holding the worker lease.

        Tasks it left mid-training are queued again (or failed after MAX_ATTEMPTS), staging
        directories are deleted, and snapshot directories without a version row (the worker died
        between rename and commit) are removed, so nothing partial or unrecorded stays visible.
        """
        actions: list[str] = []
        with self._read() as conn:
            stale = [r["id"] for r in conn.execute("SELECT id FROM tasks WHERE status IN ('training', 'evaluating')")]
            recorded = {r["version"] for r in conn.execute("SELECT version FROM versions")}
        for task_id in stale:
            self.fail_task(task_id, "the worker stopped while training this task; it was retried", retry=True)
            actions.append(f"requeued task {task_id}")
        for path in self.snapshots_dir.iterdir():
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)
                actions.append(f"removed staging {path.name}")
            elif path.name[1:].isdigit() and int(path.name[1:]) not in recorded:
                self.remove_snapshot_dir(path)
                actions.append(f"removed unrecorded snapshot {path.name}")
        return actions


WORKER_LEASE = "worker"
