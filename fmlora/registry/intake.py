"""Task intake: validate an uploaded archive completely, then store it atomically and queue it.

An archive holds one folder per class with images inside (optionally under one top-level folder).
Nothing is written to the registry's visible state until every check has passed: members are
inspected before anything is read (paths, links, counts, declared sizes), bytes are counted while
reading (so a lying zip header cannot inflate past the limit), every image is decoded, and the result
is renamed into ``HOME/tasks/<id>`` in one step before its row is committed.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import stat
import tarfile
import tempfile
import time
import unicodedata
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal

from PIL import Image, UnidentifiedImageError

from fmlora.errors import (
    ArchiveFormatError,
    ArchiveTooLargeError,
    ClassLayoutError,
    IntakeError,
    InvalidImageError,
    TaskConflictError,
    UnsafeArchiveError,
)

from .registry import Registry, TaskInfo

__all__ = ["IntakeLimits", "StoredTask", "Submission", "read_task_files", "submit", "submit_task", "validate_archive"]

# OS clutter that archivers add; skipped rather than refused, since users cannot easily avoid it.
_IGNORED_PARTS = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini"}
_FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}
_STAGING_MAX_AGE_S = 3600.0


@dataclass(frozen=True)
class IntakeLimits:
    max_archive_bytes: int = 512 * 2**20
    max_files: int = 50_000
    max_unpacked_bytes: int = 2 * 2**30
    max_file_bytes: int = 32 * 2**20
    max_image_pixels: int = 40_000_000
    max_classes: int = 1_000
    min_images_per_class: int = 2
    eval_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_images_per_class < 2:
            raise IntakeError("min_images_per_class must be at least 2 (one to train on, one to evaluate)")
        if not 0 < self.eval_fraction < 1:
            raise IntakeError("eval_fraction must be in (0, 1)")


@dataclass(frozen=True)
class _Image:
    cls: str
    original: str
    data: bytes
    suffix: str


@dataclass(frozen=True)
class StoredTask:
    """A stored task's files, as the worker reads them."""

    classes: list[str]
    train: list[tuple[Path, str]]
    eval: list[tuple[Path, str]]


def _check_name(value: str, what: str) -> str:
    """Class and task names are labels shown to users: any printable text, but nothing path-like."""
    value = unicodedata.normalize("NFC", value)
    problem = None
    if not 1 <= len(value) <= 100:
        problem = "it must be 1-100 characters long"
    elif value != value.strip():
        problem = "it starts or ends with whitespace"
    elif value in (".", "..") or value.startswith("."):
        problem = "it starts with '.'"
    elif any(ch in "/\\" or not ch.isprintable() for ch in value):
        problem = "it holds a slash, backslash or control character"
    if problem:
        raise ClassLayoutError(f"{what} {value!r} is not allowed: {problem}")
    return value


def _member_parts(name: str) -> tuple[str, ...] | None:
    """The member's path parts, or None for OS clutter; raises on anything unsafe."""
    if "\\" in name or "\x00" in name:
        raise UnsafeArchiveError(f"archive member {name!r} contains a backslash or NUL; use '/' separators")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(f"archive member {name!r} climbs out of the archive with '..'")
    if any(p in _IGNORED_PARTS or p.startswith("._") for p in parts):
        return None
    return parts


class _Budget:
    def __init__(self, limits: IntakeLimits):
        self.limits = limits
        self.files = 0
        self.bytes = 0

    def add_file(self, declared: int) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise ArchiveTooLargeError(f"the archive holds more than {self.limits.max_files} files")
        if declared > self.limits.max_file_bytes:
            raise ArchiveTooLargeError(f"a file in the archive is larger than {self.limits.max_file_bytes} bytes")

    def read(self, stream: BinaryIO, name: str) -> bytes:
        # Read one byte past the per-file cap so an understated header cannot slip through.
        cap = min(self.limits.max_file_bytes, self.limits.max_unpacked_bytes - self.bytes)
        data = stream.read(cap + 1)
        if len(data) > cap:
            raise ArchiveTooLargeError(
                f"{name!r} unpacks past the limit ({self.limits.max_file_bytes} bytes a file, "
                f"{self.limits.max_unpacked_bytes} in all): refusing what may be a zip bomb"
            )
        self.bytes += len(data)
        return data


def _zip_members(archive: zipfile.ZipFile, budget: _Budget) -> Iterator[tuple[tuple[str, ...], bytes | None]]:
    infos = archive.infolist()
    declared = 0
    for info in infos:
        parts = _member_parts(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise UnsafeArchiveError(f"archive member {info.filename!r} is a symbolic link")
        # Many zip writers leave the type bits out (permissions only): absent means a regular file.
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(f"archive member {info.filename!r} is not a regular file or folder")
        if info.flag_bits & 0x1:
            raise ArchiveFormatError(f"archive member {info.filename!r} is encrypted")
        if parts is None or info.is_dir():
            continue
        budget.add_file(info.file_size)
        declared += info.file_size
        if declared > budget.limits.max_unpacked_bytes:
            raise ArchiveTooLargeError(f"the archive unpacks to more than {budget.limits.max_unpacked_bytes} bytes")
    for info in infos:
        parts = _member_parts(info.filename)
        if parts is None:
            continue
        if info.is_dir():
            yield parts, None
            continue
        try:
            with archive.open(info) as stream:
                data = budget.read(stream, info.filename)
        # zipfile raises NotImplementedError for compression methods it cannot decode (e.g. deflate64).
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
            raise ArchiveFormatError(
                f"archive member {info.filename!r} cannot be read (damaged, or an unsupported compression method)"
            ) from exc
        yield parts, data


def _tar_members(archive: tarfile.TarFile, budget: _Budget) -> Iterator[tuple[tuple[str, ...], bytes | None]]:
    for member in archive:
        parts = _member_parts(member.name)
        if member.issym() or member.islnk():
            raise UnsafeArchiveError(f"archive member {member.name!r} is a link")
        if not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(f"archive member {member.name!r} is a device, FIFO or other special file")
        if parts is None:
            continue
        if member.isdir():
            yield parts, None
            continue
        budget.add_file(member.size)
        stream = archive.extractfile(member)
        if stream is None:
            raise ArchiveFormatError(f"archive member {member.name!r} cannot be read")
        yield parts, budget.read(stream, member.name)


def _open_members(path: Path, budget: _Budget) -> Iterator[tuple[tuple[str, ...], bytes | None]]:
    """(path parts, bytes) per file and (path parts, None) per folder entry."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = [i.filename for i in archive.infolist()]
                if len(names) != len(set(names)):
                    raise UnsafeArchiveError("the archive holds the same path twice")
                yield from _zip_members(archive, budget)
        except zipfile.BadZipFile as exc:
            raise ArchiveFormatError("the zip archive is damaged; re-create it") from exc
        return
    try:
        archive = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed in the finally below
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveFormatError("the upload is not a zip or tar archive (tar may be gzip, bzip2 or xz)") from exc
    try:
        yield from _tar_members(archive, budget)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveFormatError("the tar archive is damaged or truncated; re-create it") from exc
    finally:
        archive.close()


def _decode(data: bytes, name: str, max_pixels: int) -> str:
    """Check that ``data`` is a whole, sane image; return its file suffix."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise InvalidImageError(f"{name!r} is {width}x{height} pixels, over the limit of {max_pixels}")
            if width < 1 or height < 1:
                raise InvalidImageError(f"{name!r} has no pixels")
            fmt = img.format or ""
            img.load()  # decodes fully: truncated or corrupt data fails here
    except InvalidImageError:
        raise
    except UnidentifiedImageError as exc:
        raise InvalidImageError(f"{name!r} is not an image Pillow can read") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"{name!r} cannot be decoded: it may be truncated or corrupt") from exc
    return _FORMAT_SUFFIX.get(fmt, ".img")


def validate_archive(path: Path, limits: IntakeLimits) -> dict[str, list[_Image]]:
    """Read and check every member; return images by class (class names in archive order)."""
    size = path.stat().st_size
    if size > limits.max_archive_bytes:
        raise ArchiveTooLargeError(f"the archive is {size} bytes; the limit is {limits.max_archive_bytes}")
    if size == 0:
        raise ArchiveFormatError("the upload is empty")
    budget = _Budget(limits)
    entries = list(_open_members(path, budget))
    files = [(parts, data) for parts, data in entries if data is not None]
    folders = {parts for parts, data in entries if data is None}
    if not files:
        raise ClassLayoutError("the archive holds no files; expected one folder per class with images inside")
    # Accept one wrapping folder (what zipping a folder produces): strip it when it holds everything.
    tops = {parts[0] for parts, _ in files}
    if len(tops) == 1 and all(len(parts) == 3 for parts, _ in files):
        files = [(parts[1:], data) for parts, data in files]
        folders = {parts[1:] for parts in folders if len(parts) > 1}
    by_class: dict[str, list[_Image]] = {}
    spellings: dict[str, str] = {}
    for parts, data in files:
        shown = "/".join(parts)
        if len(parts) != 2:
            raise ClassLayoutError(
                f"{shown!r} is not inside a class folder: expected <class>/<image> (one folder per class)"
            )
        cls = _check_name(parts[0], "class name")
        # Names equal after Unicode normalisation (composed vs decomposed accents) are one class
        # spelled twice: refuse rather than guess which spelling the user meant.
        other = spellings.setdefault(cls, parts[0])
        if other != parts[0]:
            raise ClassLayoutError(f"class folders {other!r} and {parts[0]!r} are the same class spelled twice")
        assert data is not None
        suffix = _decode(data, shown, limits.max_image_pixels)
        by_class.setdefault(cls, []).append(_Image(cls, shown, data, suffix))
    empty = sorted("/".join(parts) for parts in folders if len(parts) == 1 and parts[0] not in by_class)
    if empty:
        raise ClassLayoutError(f"class folders {empty[:10]} hold no images")
    if len(by_class) > limits.max_classes:
        raise ClassLayoutError(f"the archive has {len(by_class)} classes; the limit is {limits.max_classes}")
    small = sorted(c for c, images in by_class.items() if len(images) < limits.min_images_per_class)
    if small:
        raise ClassLayoutError(
            f"classes {small[:10]} have fewer than {limits.min_images_per_class} images "
            "(each class needs images to train on and held-out images to evaluate on)"
        )
    return by_class


def _split(images: list[_Image], limits: IntakeLimits, cls: str) -> tuple[list[_Image], list[_Image]]:
    ordered = sorted(images, key=lambda i: i.original)
    random.Random(f"{limits.seed}:{cls}").shuffle(ordered)
    held_out = min(len(ordered) - 1, max(1, round(len(ordered) * limits.eval_fraction)))
    return ordered[held_out:], ordered[:held_out]


def _remove_stale_staging(tasks_dir: Path) -> None:
    cutoff = time.time() - _STAGING_MAX_AGE_S
    for path in tasks_dir.glob(".*.tmp"):
        try:
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def _spool(archive: Path | BinaryIO, directory: Path, limit: int) -> Path:
    """Copy a stream to a file (counting bytes, so an endless upload stops at the limit)."""
    fd, name = tempfile.mkstemp(prefix=".upload.", suffix=".tmp", dir=directory)
    total = 0
    with os.fdopen(fd, "wb") as out:
        while block := archive.read(1 << 20):  # type: ignore[union-attr]
            total += len(block)
            if total > limit:
                out.close()
                os.unlink(name)
                raise ArchiveTooLargeError(f"the archive is larger than the limit of {limit} bytes")
            out.write(block)
    return Path(name)


@dataclass(frozen=True)
class Submission:
    task: TaskInfo
    replayed: bool  # True when an idempotency key matched a task stored earlier: nothing new was stored


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
    if kind not in ("class", "domain"):
        raise IntakeError(f"kind must be 'class' or 'domain', got {kind!r}")
    name = _check_name(name, "task name")
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 200:
            raise IntakeError("an idempotency key must be 1-200 characters")
        existing = registry.find_task(idempotency_key=idempotency_key)
        if existing is not None:
            if existing.name != name or existing.kind != kind:
                raise TaskConflictError(
                    f"idempotency key already used for task {existing.name!r} ({existing.kind}); use a new key"
                )
            return Submission(existing, replayed=True)
    taken = registry.find_task(name=name)
    if taken is not None:
        raise TaskConflictError(f"a task named {name!r} already exists ({taken.status}); choose another name")

    _remove_stale_staging(registry.tasks_dir)
    spooled: Path | None = None
    if not isinstance(archive, (str, Path)):
        spooled = _spool(archive, registry.tasks_dir, limits.max_archive_bytes)
    source = Path(archive) if spooled is None else spooled
    try:
        if not source.is_file():
            raise ArchiveFormatError(f"{source} is not a file")
        by_class = validate_archive(source, limits)
    finally:
        if spooled is not None:
            spooled.unlink(missing_ok=True)

    classes = list(by_class)
    known = registry.known_classes()
    new = [c for c in classes if c not in known]
    if kind == "class":
        clash = [f"{c} (task {known[c]!r})" for c in classes if c in known]
        if clash:
            raise ClassLayoutError(
                f"a class-incremental task brings only new classes, but these are already known: {clash[:10]}; "
                "submit it as kind 'domain' to learn known classes in a new domain"
            )
    task_id = uuid.uuid4().hex[:16]
    staging = Path(tempfile.mkdtemp(prefix=f".{task_id}.", suffix=".tmp", dir=registry.tasks_dir))
    try:
        manifest: dict[str, object] = {"name": name, "kind": kind, "classes": classes, "new_classes": new}
        counts = {"train": 0, "eval": 0}
        files: dict[str, list[dict[str, str]]] = {"train": [], "eval": []}
        for index, cls in enumerate(classes):
            train, held_out = _split(by_class[cls], limits, cls)
            for split, images in (("train", train), ("eval", held_out)):
                folder = staging / split / f"c{index:04d}"
                folder.mkdir(parents=True)
                for number, image in enumerate(images):
                    # Stored under generated names: the original ones stay in task.json only.
                    stored = folder / f"{number:06d}{image.suffix}"
                    stored.write_bytes(image.data)
                    files[split].append(
                        {"path": str(stored.relative_to(staging)), "class": cls, "source": image.original}
                    )
                counts[split] += len(images)
        manifest["files"] = files
        (staging / "task.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        target = registry.task_dir(task_id)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        stored = registry.insert_task(
            task_id=task_id,
            name=name,
            kind=kind,
            classes=classes,
            num_train=counts["train"],
            num_eval=counts["eval"],
            idempotency_key=idempotency_key,
        )
    except BaseException as exc:
        shutil.rmtree(target, ignore_errors=True)
        # A concurrent submission took the name or key between our check and our insert.
        again = registry.find_task(idempotency_key=idempotency_key) if idempotency_key else None
        if again is not None and again.name == name and again.kind == kind:
            return Submission(again, replayed=True)
        if "UNIQUE" in str(exc):
            raise TaskConflictError(
                f"a task named {name!r} was submitted at the same time; choose another name"
            ) from exc
        raise
    return Submission(stored, replayed=False)


def read_task_files(registry: Registry, task_id: str) -> StoredTask:
    """The stored task's image paths and classes (for the worker)."""
    folder = registry.task_dir(task_id)
    manifest = json.loads((folder / "task.json").read_text(encoding="utf-8"))
    return StoredTask(
        classes=list(manifest["classes"]),
        train=[(folder / f["path"], f["class"]) for f in manifest["files"]["train"]],
        eval=[(folder / f["path"], f["class"]) for f in manifest["files"]["eval"]],
    )
