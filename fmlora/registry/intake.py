"""Task intake: validate an uploaded archive completely, then store it and queue it.

An archive holds one folder per class with images inside (optionally under one top-level folder).
``submit`` runs in steps, each refusing with an IntakeError before anything becomes visible:
check the request, spool the upload to a local file, validate every member while packing the images
into one tar (one image in memory at a time), check the classes against the registry, store the tar
in the artifact store, and insert the task's row (with the tar's sha256) last. A duplicate name or
idempotency key is the database's own unique-key violation (``DuplicateKeyError`` on every backend),
so two racing submissions store exactly one task.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import tarfile
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from fmlora.errors import (
    ArchiveFormatError,
    ArchiveTooLargeError,
    ClassLayoutError,
    DuplicateKeyError,
    IntakeError,
    TaskConflictError,
)

from .archive import ArchiveImage, IntakeLimits, check_name, validate_archive
from .artifacts import StoredTask, read_task_files
from .queue import task_archive_key
from .records import TaskInfo
from .registry import Registry

__all__ = ["IntakeLimits", "StoredTask", "Submission", "read_task_files", "submit", "submit_task", "validate_archive"]


@dataclass(frozen=True)
class Submission:
    task: TaskInfo
    replayed: bool  # True when an idempotency key matched a task stored earlier: nothing new was stored


@dataclass(frozen=True)
class _Packed:
    """A validated upload packed for the store: task.json plus images/, in one local tar."""

    path: Path
    classes: list[str]
    new_classes: list[str]
    num_train: int
    num_eval: int


def submit_task(
    registry: Registry,
    archive: Path | str | BinaryIO,
    *,
    name: str,
    kind: Literal["class", "domain"] | str,
    idempotency_key: str | None = None,
    limits: IntakeLimits | None = None,
) -> TaskInfo:
    """Validate ``archive`` and queue it as task ``name``; every refusal is an IntakeError, storing nothing.

    A repeated ``idempotency_key`` returns the task stored the first time instead of a second task.
    """
    return submit(registry, archive, name=name, kind=kind, idempotency_key=idempotency_key, limits=limits).task


def submit(
    registry: Registry,
    archive: Path | str | BinaryIO,
    *,
    name: str,
    kind: Literal["class", "domain"] | str,
    idempotency_key: str | None = None,
    limits: IntakeLimits | None = None,
) -> Submission:
    """``submit_task`` that also says whether the task was stored now or replayed from an earlier call
    with the same idempotency key (also when two such calls race: exactly one stores)."""
    limits = limits or IntakeLimits()
    name = _check_request(name, kind, idempotency_key)
    earlier = _earlier_submission(registry, name, kind, idempotency_key)
    if earlier is not None:
        return Submission(earlier, replayed=True)
    registry.scratch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".intake.", dir=registry.scratch_dir) as work:
        source = _local_archive(archive, Path(work), limits)
        packed = _pack(source, Path(work) / "task.tar", limits, name, kind, registry.known_classes())
        task_id = uuid.uuid4().hex[:16]
        key = task_archive_key(task_id)
        size = packed.path.stat().st_size
        sha256 = registry.store.put_file(key, packed.path, consume=True)
    try:
        task = registry.insert_task(
            task_id=task_id,
            name=name,
            kind=kind,
            classes=packed.classes,
            num_train=packed.num_train,
            num_eval=packed.num_eval,
            idempotency_key=idempotency_key,
            archive_sha256=sha256,
            archive_bytes=size,
        )
    except BaseException as exc:
        _forget(registry, key)
        if isinstance(exc, DuplicateKeyError):
            return _collided(registry, name, kind, idempotency_key, exc)
        raise
    return Submission(task, replayed=False)


def _check_request(name: str, kind: str, idempotency_key: str | None) -> str:
    if kind not in ("class", "domain"):
        raise IntakeError(f"kind must be 'class' or 'domain', got {kind!r}")
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 200:
        raise IntakeError("an idempotency key must be 1-200 characters")
    return check_name(name, "task name")


def _earlier_submission(registry: Registry, name: str, kind: str, idempotency_key: str | None) -> TaskInfo | None:
    """The task an earlier call with this idempotency key stored; refuses a name that is taken."""
    if idempotency_key is not None:
        existing = registry.find_task(idempotency_key=idempotency_key)
        if existing is not None:
            if existing.name != name or existing.kind != kind:
                raise TaskConflictError(
                    f"idempotency key already used for task {existing.name!r} ({existing.kind}); use a new key"
                )
            return existing
    taken = registry.find_task(name=name)
    if taken is not None:
        raise TaskConflictError(f"a task named {name!r} already exists ({taken.status}); choose another name")
    return None


def _local_archive(archive: Path | str | BinaryIO, work: Path, limits: IntakeLimits) -> Path:
    """A path to the upload: the given file, or a stream copied to ``work`` (counting bytes, so an
    endless upload stops at the limit)."""
    if isinstance(archive, (str, Path)):
        source = Path(archive)
        if not source.is_file():
            raise ArchiveFormatError(f"{source} is not a file")
        return source
    spooled = work / "upload"
    total = 0
    with spooled.open("wb") as out:
        while block := archive.read(1 << 20):
            total += len(block)
            if total > limits.max_archive_bytes:
                raise ArchiveTooLargeError(f"the archive is larger than the limit of {limits.max_archive_bytes} bytes")
            out.write(block)
    return spooled


def _pack(source: Path, target: Path, limits: IntakeLimits, name: str, kind: str, known: dict[str, str]) -> _Packed:
    """Validate ``source`` while writing its images into the tar ``target``; then split and describe them."""
    with tarfile.open(target, "w") as tar:

        def add(stored: str, data: bytes) -> None:
            info = tarfile.TarInfo(stored)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        by_class = validate_archive(source, limits, sink=add)
        classes = list(by_class)
        _check_classes(classes, kind, known)
        files: dict[str, list[dict[str, str]]] = {"train": [], "eval": []}
        for cls in classes:
            train, held_out = _split(by_class[cls], limits, cls)
            for split, images in (("train", train), ("eval", held_out)):
                files[split] += [{"path": i.stored, "class": cls, "source": i.original} for i in images]
        new = [c for c in classes if c not in known]
        manifest = {"name": name, "kind": kind, "classes": classes, "new_classes": new, "files": files}
        add("task.json", json.dumps(manifest, indent=1).encode("utf-8"))
    with target.open("rb+") as fh:
        os.fsync(fh.fileno())
    return _Packed(target, classes, new, len(files["train"]), len(files["eval"]))


def _check_classes(classes: list[str], kind: str, known: dict[str, str]) -> None:
    if kind == "class":
        clash = [f"{c} (task {known[c]!r})" for c in classes if c in known]
        if clash:
            raise ClassLayoutError(
                f"a class-incremental task brings only new classes, but these are already known: {clash[:10]}; "
                "submit it as kind 'domain' to learn known classes in a new domain"
            )


def _split(images: list[ArchiveImage], limits: IntakeLimits, cls: str) -> tuple[list[ArchiveImage], list[ArchiveImage]]:
    ordered = sorted(images, key=lambda i: i.original)
    random.Random(f"{limits.seed}:{cls}").shuffle(ordered)
    held_out = min(len(ordered) - 1, max(1, round(len(ordered) * limits.eval_fraction)))
    return ordered[held_out:], ordered[:held_out]


def _forget(registry: Registry, key: str) -> None:
    # The store may be away: recover() removes uploads that never got a row.
    with contextlib.suppress(Exception):
        registry.store.delete(key)


def _collided(
    registry: Registry, name: str, kind: str, idempotency_key: str | None, exc: DuplicateKeyError
) -> Submission:
    """A concurrent submission took the name or the key between our look-up and our insert."""
    again = registry.find_task(idempotency_key=idempotency_key) if idempotency_key else None
    if again is not None and again.name == name and again.kind == kind:
        return Submission(again, replayed=True)
    raise TaskConflictError(f"a task named {name!r} was submitted at the same time; choose another name") from exc
