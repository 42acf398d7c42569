"""Reading an uploaded archive safely: every member is inspected before it is read (paths, links,
counts, declared sizes), bytes are counted while reading (so a lying zip header cannot inflate past
the limit), and every image is decoded. ``validate_archive`` hands each good image to a sink as it
goes, so an archive is never held whole in memory.
"""

from __future__ import annotations

import io
import re
import stat
import tarfile
import unicodedata
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from fmlora.errors import (
    ArchiveFormatError,
    ArchiveTooLargeError,
    ClassLayoutError,
    IntakeError,
    InvalidImageError,
    UnsafeArchiveError,
)

__all__ = ["ArchiveImage", "IntakeLimits", "check_name", "validate_archive"]


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


# OS clutter that archivers add; skipped rather than refused, since users cannot easily avoid it.
_IGNORED_PARTS = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini"}
_FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}


def check_name(value: str, what: str) -> str:
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


@dataclass(frozen=True)
class ArchiveImage:
    cls: str
    original: str  # its path in the upload, kept in task.json only
    stored: str  # its generated path in the stored task: images/<n><suffix>


def validate_archive(
    path: Path, limits: IntakeLimits, sink: Callable[[str, bytes], None] | None = None
) -> dict[str, list[ArchiveImage]]:
    """Read and check every member; return images by class (class names in archive order).

    ``sink(stored_path, data)`` receives each decoded image as soon as it is checked; the layout is
    checked once every member has been seen, so a caller discards what the sink wrote on an error.
    """
    size = path.stat().st_size
    if size > limits.max_archive_bytes:
        raise ArchiveTooLargeError(f"the archive is {size} bytes; the limit is {limits.max_archive_bytes}")
    if size == 0:
        raise ArchiveFormatError("the upload is empty")
    budget = _Budget(limits)
    files: list[tuple[tuple[str, ...], str]] = []
    folders: set[tuple[str, ...]] = set()
    for parts, data in _open_members(path, budget):
        if data is None:
            folders.add(parts)
            continue
        shown = "/".join(parts)
        if not 2 <= len(parts) <= 3:  # <class>/<image>, possibly inside one wrapping folder
            raise ClassLayoutError(
                f"{shown!r} is not inside a class folder: expected <class>/<image> (one folder per class)"
            )
        stored = f"images/{len(files):06d}{_decode(data, shown, limits.max_image_pixels)}"
        if sink is not None:
            sink(stored, data)
        files.append((parts, stored))
    return _by_class(files, folders, limits)


def _by_class(
    files: list[tuple[tuple[str, ...], str]], folders: set[tuple[str, ...]], limits: IntakeLimits
) -> dict[str, list[ArchiveImage]]:
    if not files:
        raise ClassLayoutError("the archive holds no files; expected one folder per class with images inside")
    # Accept one wrapping folder (what zipping a folder produces): strip it when it holds everything.
    tops = {parts[0] for parts, _ in files}
    if len(tops) == 1 and all(len(parts) == 3 for parts, _ in files):
        files = [(parts[1:], stored) for parts, stored in files]
        folders = {parts[1:] for parts in folders if len(parts) > 1}
    by_class: dict[str, list[ArchiveImage]] = {}
    spellings: dict[str, str] = {}
    for parts, stored in files:
        shown = "/".join(parts)
        if len(parts) != 2:
            raise ClassLayoutError(
                f"{shown!r} is not inside a class folder: expected <class>/<image> (one folder per class)"
            )
        cls = check_name(parts[0], "class name")
        # Names equal after Unicode normalisation (composed vs decomposed accents) are one class
        # spelled twice: refuse rather than guess which spelling the user meant.
        other = spellings.setdefault(cls, parts[0])
        if other != parts[0]:
            raise ClassLayoutError(f"class folders {other!r} and {parts[0]!r} are the same class spelled twice")
        by_class.setdefault(cls, []).append(ArchiveImage(cls, shown, stored))
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
