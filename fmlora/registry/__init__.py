"""The registry: tasks, versions, the live pointer and leases in one database; task intake
(validate an uploaded archive, then store it); and the one function that publishes a version.

May import ``fmlora.model``, ``fmlora.training`` and ``fmlora.data``.
"""

from .intake import IntakeLimits, StoredTask, Submission, read_task_files, submit, submit_task, validate_archive
from .publish import publish_version
from .registry import TASK_STATUSES, VERSION_STATES, Event, Lease, Registry, TaskInfo, VersionInfo

__all__ = [
    "TASK_STATUSES",
    "VERSION_STATES",
    "Event",
    "IntakeLimits",
    "Lease",
    "Registry",
    "StoredTask",
    "Submission",
    "TaskInfo",
    "VersionInfo",
    "publish_version",
    "read_task_files",
    "submit",
    "submit_task",
    "validate_archive",
]
