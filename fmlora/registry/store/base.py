"""The artifact store's contract: named objects (snapshots, worker state, task archives) with sha256.

Keys are relative POSIX paths (``snapshots/v3/adapter_model.safetensors``, ``tasks/<id>.tar``).
Every put streams from a local file and returns the sha256 of what was stored, which the registry
records; every get streams to a local file (written beside, renamed) and refuses bytes whose sha256
differs from the one given. Nothing is ever held whole in memory except ``read_bytes`` of small
objects.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from fmlora.errors import ObjectIntegrityError, StoreError

__all__ = ["CHUNK", "ArtifactStore", "ObjectInfo", "check_key", "hashing_copy", "sha256_of", "staged_file"]

CHUNK = 1 << 20


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # seconds since the epoch


def check_key(key: str) -> str:
    parts = PurePosixPath(key).parts
    if not parts or key.startswith("/") or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise StoreError(f"invalid object key {key!r}")
    return key


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def hashing_copy(source: BinaryIO, target: BinaryIO) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while block := source.read(CHUNK):
        digest.update(block)
        size += len(block)
        target.write(block)
    return digest.hexdigest(), size


@contextmanager
def staged_file(dest: Path) -> Iterator[Path]:
    """A temporary path beside ``dest`` that becomes ``dest`` (by rename) only if the block succeeds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def verify(actual: str, expected: str | None, what: str) -> None:
    if expected is not None and actual != expected:
        raise ObjectIntegrityError(
            f"{what} is corrupt or was modified: sha256 {actual[:12]}… != recorded {expected[:12]}…"
        )


class ArtifactStore(ABC):
    """Where a registry keeps its objects; ``file://`` (a directory) or ``s3://bucket/prefix``."""

    url: str  # safe to print

    @abstractmethod
    def check(self) -> None:
        """Fail now, with a message naming the setting, if the store cannot be used."""

    @abstractmethod
    def put_file(self, key: str, path: Path, *, consume: bool = False) -> str:
        """Store the file at ``path`` as ``key`` (replacing it); return its sha256. With ``consume`` the
        caller gives the file up (the store may move it instead of copying)."""

    def put_dir(self, prefix: str, directory: Path, *, consume: bool = False) -> dict[str, str]:
        """Store every file of a flat ``directory`` under ``prefix/``; return {file name: sha256}.
        Files are put in name order; a store that can (a directory) makes them appear at once."""
        return {
            p.name: self.put_file(f"{prefix}/{p.name}", p, consume=consume)
            for p in sorted(directory.iterdir())
            if p.is_file()
        }

    @abstractmethod
    def get_file(self, key: str, dest: Path, sha256: str | None = None) -> None:
        """Stream ``key`` into ``dest`` (beside, then renamed), refusing it unless its sha256 matches."""

    def get_files(self, files: Mapping[str, tuple[Path, str | None]]) -> None:
        """``get_file`` for each ``{key: (dest, sha256)}``; every one is attempted, then the first
        failure (in key order) is raised. A store whose reads wait on a network overlaps them."""
        errors = []
        for key, (dest, sha256) in files.items():
            try:
                self.get_file(key, dest, sha256)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    @abstractmethod
    def read_bytes(self, key: str, sha256: str | None = None) -> bytes:
        """A small object's bytes, verified against ``sha256``."""

    @abstractmethod
    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix/``."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under ``prefix/`` (missing ones are not an error)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object (missing is not an error)."""

    def local_path(self, key: str) -> Path | None:
        """Where the object (or prefix) lives on this machine, when the store is a directory here."""
        return None
