"""Reading a registry's objects on this host: a version's snapshot, its worker state, a task's files.

Each object is verified against the sha256 in its registry row. Objects from a store that is not a
local directory are fetched into HOME/cache (written beside, verified, renamed), so several
processes on one host can fetch the same version at once.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fmlora.errors import ObjectIntegrityError, ObjectNotFoundError, WorkerStateError, WorkerStateIntegrityError

from .queue import task_archive_key
from .records import WORKER_STATE_OBJECT, VersionInfo
from .store import FileStore
from .store.base import sha256_of
from .worker_state import WorkerState, parse_worker_state

if TYPE_CHECKING:
    from .registry import Registry

__all__ = ["StoredTask", "fetch_task", "fetch_version", "read_task_files", "read_worker_state"]


@dataclass(frozen=True)
class StoredTask:
    """A stored task's files, as the worker reads them."""

    classes: list[str]
    train: list[tuple[Path, str]]
    eval: list[tuple[Path, str]]


def _verified(directory: Path, objects: dict[str, str]) -> bool:
    try:
        return all(sha256_of(directory / name) == sha for name, sha in objects.items())
    except OSError:
        return False


def fetch_version(registry: Registry, version: int, info: VersionInfo | None = None) -> Path:
    """A local directory holding version ``version``'s objects, every one matching its recorded sha256.

    In a ``file://`` store that is the stored directory itself; otherwise HOME/cache/versions/v<N>/,
    filled from the store when absent or not matching. Raises ``ObjectIntegrityError`` when the
    stored bytes do not match the registry (the version must not be served). ``info``: the version's
    row if the caller has it (a row's sha256 and objects never change once recorded), else read here.
    """
    if info is None or info.version != version:
        info = registry.get_version(version)
    # Versions recorded before objects were hashed carry only the tensor hash (checked by read_snapshot).
    objects = {k: v for k, v in info.objects.items() if k != WORKER_STATE_OBJECT}
    target = registry.snapshot_dir(version)
    if isinstance(registry.store, FileStore):
        if not _verified(target, objects):
            raise ObjectIntegrityError(f"version {version}'s files in {target} do not match the registry's sha256")
        return target
    if target.is_dir() and _verified(target, objects):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".v{version}.", suffix=".tmp", dir=target.parent))
    try:
        prefix = f"snapshots/v{version}"
        registry.store.get_files({f"{prefix}/{name}": (staging / name, sha) for name, sha in objects.items()})
        if target.exists():  # a stale or damaged copy: move it aside, then take its place
            doomed = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.deleting")
            try:
                os.rename(target, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
            except OSError:
                pass
        try:
            os.rename(staging, target)
        except OSError:
            if not _verified(target, objects):  # another process on this host put it there meanwhile
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_worker_state(registry: Registry, version: int) -> WorkerState | None:
    """The worker state published with ``version``, verified; None when the version has none.

    Raises ``WorkerStateIntegrityError`` when the stored object does not match its recorded sha256
    (a corrupted state is refused, never used) and ``WorkerStateError`` when it is missing.
    """
    info = registry.get_version(version)
    sha256 = info.worker_state_sha256
    if sha256 is None:
        return None
    key = f"snapshots/v{version}/{WORKER_STATE_OBJECT}"
    try:
        data = registry.store.read_bytes(key, sha256)
    except ObjectIntegrityError as exc:
        raise WorkerStateIntegrityError(f"the worker state of version {version} is corrupt: {exc}") from exc
    except ObjectNotFoundError as exc:
        raise WorkerStateError(f"the worker state of version {version} is missing from {registry.store.url}") from exc
    return parse_worker_state(data, key)


def fetch_task(registry: Registry, task_id: str) -> Path:
    """A local directory with a task's files (task.json, train/, eval/), verified and unpacked."""
    task = registry.get_task(task_id)
    if task.archive_sha256 is None:
        return registry.task_dir(task_id)  # stored unpacked, before the artifact store
    target = registry.cache_dir / "tasks" / task_id
    if (target / "task.json").is_file():
        return target  # complete: it is renamed into place only after unpacking
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{task_id}.", suffix=".tmp", dir=target.parent))
    try:
        archive = staging / "archive.tar"
        registry.store.get_file(task_archive_key(task_id), archive, task.archive_sha256)
        unpacked = staging / "files"
        with tarfile.open(archive) as tar:
            # Written by intake and verified by sha256; the data filter still refuses anything unsafe.
            tar.extractall(unpacked, filter="data")
        try:
            os.rename(unpacked, target)
        except OSError:
            if not (target / "task.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_task_files(registry: Registry, task_id: str) -> StoredTask:
    """The stored task's image paths and classes (for the worker)."""
    folder = fetch_task(registry, task_id)
    manifest = json.loads((folder / "task.json").read_text(encoding="utf-8"))
    return StoredTask(
        classes=list(manifest["classes"]),
        train=[(folder / f["path"], f["class"]) for f in manifest["files"]["train"]],
        eval=[(folder / f["path"], f["class"]) for f in manifest["files"]["eval"]],
    )
