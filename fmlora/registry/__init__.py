"""The registry: tasks, versions, the live pointer and leases in one database (SQLite or PostgreSQL);
snapshots, per-version worker state and task archives in one artifact store (a directory or S3);
task intake (validate an uploaded archive, then store it); and the one function that publishes a version.

May import ``fmlora.model``, ``fmlora.training`` and ``fmlora.data``.
"""

from .archive import IntakeLimits, validate_archive
from .artifacts import StoredTask, fetch_task, fetch_version, read_task_files, read_worker_state
from .feed import VERSIONS_CHANNEL, notifications, supports_notifications
from .intake import Submission, submit, submit_task
from .publish import publish_version
from .records import TASK_STATUSES, VERSION_STATES, WORKER_LEASE, Event, Lease, TaskInfo, VersionInfo
from .registry import Registry, open_registry
from .store import ArtifactStore, FileStore, S3Options, S3Store
from .urls import REGISTRY_SETTING, STORE_SETTING, open_store
from .worker_state import WorkerState

__all__ = [
    "REGISTRY_SETTING",
    "STORE_SETTING",
    "TASK_STATUSES",
    "VERSIONS_CHANNEL",
    "VERSION_STATES",
    "WORKER_LEASE",
    "ArtifactStore",
    "Event",
    "FileStore",
    "IntakeLimits",
    "Lease",
    "Registry",
    "S3Options",
    "S3Store",
    "StoredTask",
    "Submission",
    "TaskInfo",
    "VersionInfo",
    "WorkerState",
    "fetch_task",
    "fetch_version",
    "notifications",
    "open_registry",
    "open_store",
    "publish_version",
    "read_task_files",
    "read_worker_state",
    "submit",
    "submit_task",
    "supports_notifications",
    "validate_archive",
]
