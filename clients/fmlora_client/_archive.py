"""Task uploads: a folder is zipped into a temporary file (then streamed from disk); an archive goes as it is.

The folder layout is the server's: one sub-folder per class, images inside (``DIR/robin/001.jpg``). Hidden
files and folders (``.DS_Store``, ``.git``, ``__MACOSX``) are left out; symlinked folders are not followed.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import InvalidInputError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# Already-compressed formats are stored, everything else deflated: no CPU wasted re-compressing JPEGs.
_STORED_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".zip", ".gz", ".xz", ".bz2"})


@dataclass
class Upload:
    """An archive ready for the multipart field ``archive``: a name, a rewindable binary file, a type."""

    filename: str
    file: IO[bytes]
    content_type: str


def _skip(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def iter_folder_files(folder: Path) -> Iterator[Path]:
    """Regular files under ``folder`` in a stable (sorted) order, hidden entries and linked folders excluded."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not _skip(d))
        for name in sorted(files):
            path = Path(root, name)
            if not _skip(name) and path.is_file():
                yield path


def zip_folder(folder: Path, out: IO[bytes]) -> int:
    """Write ``folder`` as a zip into ``out`` (paths relative to it, POSIX separators); returns the file count."""
    count = 0
    with zipfile.ZipFile(out, "w", allowZip64=True) as archive:
        for path in iter_folder_files(folder):
            arcname = path.relative_to(folder).as_posix()
            compress = zipfile.ZIP_STORED if path.suffix.lower() in _STORED_SUFFIXES else zipfile.ZIP_DEFLATED
            archive.write(path, arcname, compress_type=compress)
            count += 1
    return count


def _content_type(name: str) -> str:
    lower = name.lower()
    if lower.endswith(".zip"):
        return "application/zip"
    if lower.endswith((".tar.gz", ".tgz")):
        return "application/gzip"
    if lower.endswith((".tar.bz2", ".tbz2")):
        return "application/x-bzip2"
    if lower.endswith((".tar.xz", ".txz")):
        return "application/x-xz"
    if lower.endswith(".tar"):
        return "application/x-tar"
    return "application/octet-stream"


def _looks_like_archive(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)
    except OSError:
        return False


@contextmanager
def open_upload(source: str | os.PathLike | IO[bytes] | Any) -> Iterator[Upload]:
    """Open a task upload: a folder (zipped on the fly into a temp file), an archive path, or a binary file.

    The yielded file is rewound before each send by httpx, so a retried request re-sends the same bytes.
    A temporary zip is deleted when the context exits.
    """
    if hasattr(source, "read") and not isinstance(source, (str, os.PathLike)):
        name = Path(str(getattr(source, "name", "") or "upload.zip")).name
        yield Upload(name, source, _content_type(name))
        return
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidInputError(f"submit a folder, an archive path or a binary file, not {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        with tempfile.TemporaryFile(prefix="fmlora-task-", suffix=".zip") as tmp:
            if zip_folder(path, tmp) == 0:
                raise InvalidInputError(f"{path}: the folder holds no files (expected one sub-folder per class)")
            tmp.seek(0)
            name = (path.resolve().name or "task") + ".zip"
            yield Upload(name, tmp, "application/zip")
        return
    if path.is_file():
        if not path.name.lower().endswith(ARCHIVE_SUFFIXES) and not _looks_like_archive(path):
            raise InvalidInputError(f"{path}: not a folder or an archive ({', '.join(ARCHIVE_SUFFIXES)})")
        with path.open("rb") as handle:
            yield Upload(path.name, handle, _content_type(path.name))
        return
    raise FileNotFoundError(f"no such folder or archive: {path}")
