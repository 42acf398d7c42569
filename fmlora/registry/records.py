"""The registry's rows as frozen pydantic models, and how a database row becomes one.

Both backends return rows that index by column name; JSON columns are TEXT on both, so decoding is
the same everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "ACTIVE_STATUSES",
    "MAX_ATTEMPTS",
    "SNAPSHOT_OBJECTS",
    "TASK_STATUSES",
    "VERSION_STATES",
    "WORKER_LEASE",
    "WORKER_STATE_OBJECT",
    "Event",
    "Lease",
    "TaskInfo",
    "VersionInfo",
    "event_from_row",
    "now_iso",
    "task_from_row",
    "version_from_row",
]

TaskStatus = Literal["queued", "training", "evaluating", "live", "rejected", "failed"]
VersionState = Literal["candidate", "live", "rejected", "retired"]
TASK_STATUSES: tuple[str, ...] = ("queued", "training", "evaluating", "live", "rejected", "failed")
VERSION_STATES: tuple[str, ...] = ("candidate", "live", "rejected", "retired")
ACTIVE_STATUSES = ("training", "evaluating")
MAX_ATTEMPTS = 3
WORKER_LEASE = "worker"
# The objects of one version in the store, under snapshots/v<N>/; the worker state is optional.
SNAPSHOT_OBJECTS = ("adapter_model.safetensors", "adapter_config.json")
WORKER_STATE_OBJECT = "worker_state.safetensors"


def now_iso() -> str:
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
    # The stored archive (tasks/<id>.tar in the store) and its sha256; None for tasks stored
    # unpacked under HOME/tasks/<id>/ before the artifact store existed.
    archive_sha256: str | None = None
    archive_bytes: int | None = None


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
    # sha256 of every object of the version in the store (file name -> hex digest).
    objects: dict[str, str] = {}

    @property
    def worker_state_sha256(self) -> str | None:
        return self.objects.get(WORKER_STATE_OBJECT)


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
    expires: float  # seconds since the epoch, on the database's clock


def task_from_row(row: Mapping[str, Any]) -> TaskInfo:
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
        archive_sha256=row["archive_sha256"],
        archive_bytes=row["archive_bytes"],
    )


def version_from_row(row: Mapping[str, Any]) -> VersionInfo:
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
        objects=json.loads(row["objects"] or "{}"),
    )


def event_from_row(row: Mapping[str, Any]) -> Event:
    return Event(
        id=row["id"],
        at=row["at"],
        kind=row["kind"],
        task_id=row["task_id"],
        version=row["version"],
        detail=json.loads(row["detail"]),
    )
