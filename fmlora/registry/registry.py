"""The registry: tasks, versions, the live pointer, leases and an event log in one database, and the
versions' and tasks' objects in one artifact store.

    database   FMLORA_REGISTRY_URL: SQLite at HOME/registry.db (default) or PostgreSQL
    store      FMLORA_STORE_URL: HOME itself (default) or s3://bucket/prefix
                 snapshots/v<N>/   adapter_model.safetensors, adapter_config.json[, worker_state.safetensors]
                 tasks/<id>.tar    a validated upload, as the worker reads it
    HOME       local to each process's host: cache/ (objects fetched from the store), tmp/ (staging)

Every state change is one database transaction (see ``database``). A version's objects are in the
store before the row that makes them visible is committed, each with its sha256 in that row;
objects without a row are debris from a crash, which ``recover()`` removes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from fmlora.errors import (
    RegistryConfigError,
    RegistryError,
    VersionNotFoundError,
    VersionStateError,
)
from fmlora.model.config import ModelConfig

from .database import VERSIONS_CHANNEL, Database, Tx
from .queue import TaskQueue
from .records import SNAPSHOT_OBJECTS, WORKER_LEASE, Event, VersionInfo, event_from_row, now_iso, version_from_row
from .store import ArtifactStore, FileStore, S3Options
from .urls import open_database, open_store

if TYPE_CHECKING:
    from .worker_state import WorkerState

__all__ = ["Registry", "open_registry"]


def _snapshot_prefix(version: int) -> str:
    return f"snapshots/v{version}"


class Registry(TaskQueue):
    """Handle on one registry. Cheap to create; safe to use from many threads and processes."""

    def __init__(self, home: Path, model_config: ModelConfig, database: Database, store: ArtifactStore):
        self.home = home
        self.model_config = model_config
        self.db = database
        self.store = store
        self.cache_dir = home / "cache"
        self.scratch_dir = home / "tmp"
        self.tasks_dir = home / "tasks"  # where tasks stored before the artifact store were unpacked
        self.registry_url: str | None = None
        self.store_url: str | None = None
        self.snapshots_dir = store.root / "snapshots" if isinstance(store, FileStore) else self.cache_dir / "versions"

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        home: str | Path,
        model_config: ModelConfig | None = None,
        *,
        registry_url: str | None = None,
        store_url: str | None = None,
        s3: S3Options | None = None,
    ) -> Registry:
        """Open (creating and migrating if needed) the registry; ``home`` holds this host's cache.

        The first open records ``model_config`` (default: ``ModelConfig()``) in the database; later
        opens must pass the same configuration or none, since every snapshot is made for one model.
        """
        home = Path(home).expanduser().resolve()
        try:
            for sub in ("", "tmp", "cache"):
                (home / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create the registry directory {home}: {exc}") from exc
        database = open_database(registry_url, home)
        database.migrate()
        store = open_store(store_url, home, s3)
        stored = cls._stored_config(database, home, model_config)
        registry = cls(home, stored, database, store)
        # As given (secrets included, never printed): what a child process (a worker) is started with.
        registry.registry_url, registry.store_url = registry_url or None, store_url or None
        return registry

    @staticmethod
    def _stored_config(database: Database, home: Path, given: ModelConfig | None) -> ModelConfig:
        with database.read() as tx:
            text = tx.value("SELECT value FROM meta WHERE key = 'model_config'")
        if text is None:
            # Homes made before the configuration moved into the database kept it in model.json.
            legacy = home / "model.json"
            first = legacy.read_text(encoding="utf-8") if legacy.is_file() and database.dialect == "sqlite" else None
            first = first or (given or ModelConfig()).model_dump_json()
            with database.write() as tx:  # first writer wins: a concurrent open may have stored one
                if tx.value("SELECT value FROM meta WHERE key = 'model_config'") is None:
                    tx.execute("INSERT INTO meta (key, value) VALUES ('model_config', ?)", (first,))
                text = tx.value("SELECT value FROM meta WHERE key = 'model_config'")
        try:
            stored = ModelConfig.model_validate_json(text)
        except (ValidationError, ValueError) as exc:
            raise RegistryConfigError(
                f"the registry {database.display} holds an invalid model configuration: {exc}"
            ) from exc
        if given is not None and given != stored:
            raise RegistryConfigError(
                f"the registry {database.display} was created for another model configuration; "
                "use a new registry for a different backbone or adapter layout"
            )
        return stored

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return self.db.schema_version()

    @property
    def db_path(self) -> Path:
        """The SQLite file (embedded default only)."""
        path = getattr(self.db, "path", None)
        if path is None:
            raise RegistryError(f"the registry is {self.db.display}, not a SQLite file")
        return path

    # -- events ----------------------------------------------------------------------------------
    @staticmethod
    def _event(tx: Tx, kind: str, task_id: str | None = None, version: int | None = None, **detail: Any) -> None:
        tx.execute(
            "INSERT INTO events (at, kind, task_id, version, detail) VALUES (?, ?, ?, ?, ?)",
            (now_iso(), kind, task_id, version, json.dumps(detail)),
        )

    def events(self, since: int = 0, limit: int = 1000) -> list[Event]:
        with self.db.read() as tx:
            rows = tx.rows("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (since, limit))
        return [event_from_row(r) for r in rows]

    # -- versions and the live pointer -------------------------------------------------------------
    @staticmethod
    def _live(tx: Tx) -> int | None:
        value = tx.value("SELECT value FROM meta WHERE key = 'live_version'")
        return int(value) if value else None

    def live_version(self) -> int | None:
        with self.db.read() as tx:
            return self._live(tx)

    def live(self) -> VersionInfo | None:
        # One statement: a replica reads this on every notification, and each round trip to a busy
        # database server costs a scheduling wait on a loaded host.
        with self.db.read() as tx:
            row = tx.row(
                "SELECT * FROM versions WHERE version = "
                "(SELECT CAST(NULLIF(value, '') AS BIGINT) FROM meta WHERE key = 'live_version')"
            )
        return None if row is None else version_from_row(row)

    @staticmethod
    def _check_number(version: int) -> None:
        # Version numbers are 64-bit integers: a larger one cannot exist, and must not become an overflow.
        if not 0 < version < 2**63:
            raise VersionNotFoundError(f"version {version} does not exist")

    def get_version(self, version: int) -> VersionInfo:
        self._check_number(version)
        with self.db.read() as tx:
            row = tx.row("SELECT * FROM versions WHERE version = ?", (version,))
        if row is None:
            raise VersionNotFoundError(f"version {version} does not exist")
        return version_from_row(row)

    def list_versions(self) -> list[VersionInfo]:
        with self.db.read() as tx:
            return [version_from_row(r) for r in tx.rows("SELECT * FROM versions ORDER BY version")]

    def snapshot_dir(self, version: int) -> Path:
        """Where version ``version``'s files are on this host: in a ``file://`` store, the stored
        directory itself; otherwise the local cache that ``fetch_version`` fills."""
        return self.snapshots_dir / f"v{version}"

    def _highest(self, tx: Tx) -> int:
        rows = int(tx.value("SELECT COALESCE(MAX(version), 0) FROM versions") or 0)
        handed_out = int(tx.value("SELECT value FROM meta WHERE key = 'version_high'") or 0)
        on_disk = 0
        if isinstance(self.store, FileStore) and self.snapshots_dir.is_dir():
            # Snapshots written by hand (benchmarks, tests) before their row: never reuse their number.
            on_disk = max((int(p.name[1:]) for p in self.snapshots_dir.glob("v*") if p.name[1:].isdigit()), default=0)
        return max(rows, handed_out, on_disk)

    def next_version(self) -> int:
        """The number the next version gets: above every row and every number handed out before."""
        with self.db.read() as tx:
            return self._highest(tx) + 1

    def reserve_version(self, lease_owner: str | None = None) -> int:
        """Hand out the next version number for good: a publish that dies leaves a gap, never a reuse,
        so versions stay strictly increasing whichever worker publishes next."""
        with self.db.write() as tx:
            if lease_owner is not None:
                self._check_lease(tx, WORKER_LEASE, lease_owner)
            number = self._highest(tx) + 1
            tx.execute("UPDATE meta SET value = ? WHERE key = 'version_high'", (str(number),))
        return number

    def _set_live(self, tx: Tx, version: int, kind: str) -> None:
        previous = self._live(tx)
        tx.execute("UPDATE versions SET state = 'retired' WHERE state = 'live' AND version != ?", (version,))
        tx.execute("UPDATE versions SET state = 'live' WHERE version = ?", (version,))
        tx.execute("UPDATE meta SET value = ? WHERE key = 'live_version'", (str(version),))
        changes = int(tx.value("SELECT value FROM meta WHERE key = 'live_changes'") or 0)
        tx.execute("UPDATE meta SET value = ? WHERE key = 'live_changes'", (str(changes + 1),))
        tx.notify(
            VERSIONS_CHANNEL, json.dumps({"event": kind, "version": version, "live": version, "previous": previous})
        )

    def _stored_names(self, version: int) -> set[str]:
        prefix = _snapshot_prefix(version)
        return {o.key[len(prefix) + 1 :] for o in self.store.list(prefix)}

    def activate(self, version: int) -> VersionInfo:
        """Make a published version live (rollback or roll forward)."""
        self._check_number(version)
        info = self.get_version(version)
        self._check_activatable(info.state, version)
        # Checked before the transaction: a store round trip must not hold the database's write lock.
        missing = set(info.objects or {"adapter_config.json": ""}) - self._stored_names(version)
        if missing:
            raise VersionStateError(f"version {version}'s objects {sorted(missing)} are missing from {self.store.url}")
        with self.db.write() as tx:
            row = tx.row("SELECT state FROM versions WHERE version = ?", (version,))
            if row is None:
                raise VersionNotFoundError(f"version {version} does not exist")
            self._check_activatable(row["state"], version)
            previous = self._live(tx)
            self._set_live(tx, version, "activated")
            self._event(tx, "activated", version=version, previous=previous)
        return self.get_version(version)

    @staticmethod
    def _check_activatable(state: str, version: int) -> None:
        if state not in ("live", "retired"):
            raise VersionStateError(
                f"version {version} is {state}; only published versions (live or retired) can be activated"
            )

    def _objects_on_disk(self, version: int) -> dict[str, str]:
        from .store.base import sha256_of

        directory = self.snapshot_dir(version)
        if not isinstance(self.store, FileStore) or not (directory / "adapter_config.json").is_file():
            raise RegistryError(f"snapshot v{version} is not in {self.store.url}; store its objects before recording")
        return {p.name: sha256_of(p) for p in sorted(directory.iterdir()) if p.is_file()}

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
        objects: dict[str, str] | None = None,
    ) -> VersionInfo:
        """Record a version whose objects are already stored: live when ``accepted``, else rejected.

        ``objects``: sha256 of each stored object (None: hash the files of a ``file://`` store's
        snapshot directory). With ``lease_owner`` the write happens only while that owner still holds
        the worker lease, so a worker that stalled past its lease cannot publish over its successor.
        """
        if objects is None:
            objects = self._objects_on_disk(version)
        elif set(SNAPSHOT_OBJECTS) - set(objects):
            missing = set(SNAPSHOT_OBJECTS) - set(objects)
            raise RegistryError(f"version {version} lacks objects {sorted(missing)}")
        now = now_iso()
        with self.db.write() as tx:
            if lease_owner is not None:
                self._check_lease(tx, WORKER_LEASE, lease_owner)
            tx.execute(
                "INSERT INTO versions (version, parent, sha256, state, tasks, card, created_at, adapter_bytes,"
                " task_id, objects) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    version,
                    parent,
                    sha256,
                    "candidate" if accepted else "rejected",
                    json.dumps(tasks),
                    json.dumps(card),
                    now,
                    adapter_bytes,
                    task_id,
                    json.dumps(objects, sort_keys=True),
                ),
            )
            high = int(tx.value("SELECT value FROM meta WHERE key = 'version_high'") or 0)
            tx.execute("UPDATE meta SET value = ? WHERE key = 'version_high'", (str(max(high, version)),))
            if accepted:
                self._set_live(tx, version, "published")
            if task_id is not None:
                reasons = "; ".join(card.get("gate", {}).get("reasons", [])) or "rejected"
                tx.execute(
                    "UPDATE tasks SET status = ?, version = ?, metrics = ?, error = ?, updated_at = ? WHERE id = ?",
                    (
                        "live" if accepted else "rejected",
                        version,
                        json.dumps(card),
                        None if accepted else reasons,
                        now,
                        task_id,
                    ),
                )
            self._event(tx, "published" if accepted else "rejected", task_id=task_id, version=version)
        return self.get_version(version)

    def prune(self, keep: int) -> list[int]:
        """Delete all but the ``keep`` newest non-live versions (rejected ones included); never the live one."""
        if keep < 0:
            raise RegistryError("keep must be >= 0")
        with self.db.write() as tx:
            live = self._live(tx)
            rows = tx.rows("SELECT version FROM versions ORDER BY version DESC")
            doomed = [r["version"] for r in rows if r["version"] != live][keep:]
            for version in doomed:
                tx.execute("DELETE FROM versions WHERE version = ?", (version,))
                self._event(tx, "pruned", version=version)
        for version in doomed:
            self.store.delete_prefix(_snapshot_prefix(version))
            if not isinstance(self.store, FileStore):  # this host's copy of a pruned version
                shutil.rmtree(self.snapshot_dir(version), ignore_errors=True)
        return doomed

    # -- objects ---------------------------------------------------------------------------------
    def fetch_version(self, version: int, info: VersionInfo | None = None) -> Path:
        """A local directory with version ``version``'s objects, each verified against its recorded sha256
        (``info``: the version's row, when the caller has just read it)."""
        from .artifacts import fetch_version

        return fetch_version(self, version, info)

    def read_worker_state(self, version: int) -> WorkerState | None:
        """The worker state published with ``version``, verified by its sha256; None if it has none."""
        from .artifacts import read_worker_state

        return read_worker_state(self, version)

    def listen(self, timeout_s: float = 1.0) -> Iterator[dict[str, Any] | None]:
        """Payloads (dicts) of version changes as they commit: PostgreSQL only (see ``feed``)."""
        from .feed import notifications

        return notifications(self, timeout_s)


def open_registry(
    url: str | None,
    home: str | Path,
    model_config: ModelConfig | None = None,
    *,
    store_url: str | None = None,
    s3: S3Options | None = None,
) -> Registry:
    """``Registry.open`` from settings: ``url`` is FMLORA_REGISTRY_URL, ``store_url`` FMLORA_STORE_URL
    (None: the embedded defaults under ``home``)."""
    return Registry.open(home, model_config, registry_url=url, store_url=store_url, s3=s3)
