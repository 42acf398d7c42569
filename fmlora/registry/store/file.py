"""``file://``: objects are files under one directory (the embedded default: FMLORA_HOME itself,
so ``snapshots/v<N>/`` and ``tasks/`` sit where they always have)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from fmlora.errors import ObjectNotFoundError, SnapshotExistsError, StoreConfigError, StoreError
from fmlora.model.snapshot import fsync_path

from .base import ArtifactStore, ObjectInfo, check_key, hashing_copy, sha256_of, staged_file, verify

__all__ = ["FileStore"]


class FileStore(ArtifactStore):
    def __init__(self, root: Path, setting: str = "FMLORA_STORE_URL"):
        self.root = root
        self.url = f"file://{root}"
        self.setting = setting

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe.", delete=True)  # noqa: SIM115
            probe.close()
        except OSError as exc:
            raise StoreConfigError(f"{self.setting} ({self.url}) is not a writable directory: {exc}") from exc

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def put_file(self, key: str, path: Path, *, consume: bool = False) -> str:
        dest = self._path(key)
        try:
            with staged_file(dest) as tmp:
                if consume and os.stat(path).st_dev == os.stat(dest.parent).st_dev:
                    sha256 = sha256_of(path)
                    os.rename(path, tmp)
                else:
                    with path.open("rb") as source, tmp.open("wb") as target:
                        sha256, _ = hashing_copy(source, target)
                        target.flush()
                        os.fsync(target.fileno())
            fsync_path(dest.parent)
        except OSError as exc:
            raise StoreError(f"cannot store {key} in {self.url}: {exc}") from exc
        return sha256

    def put_dir(self, prefix: str, directory: Path, *, consume: bool = False) -> dict[str, str]:
        # One rename makes the whole directory appear: readers see all of its files or none.
        dest = self._path(prefix)
        if dest.exists():
            raise SnapshotExistsError(f"{dest} already exists; stored objects are immutable")
        hashes = {p.name: sha256_of(p) for p in sorted(directory.iterdir()) if p.is_file()}
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if consume and os.stat(directory).st_dev == os.stat(dest.parent).st_dev:
                os.rename(directory, dest)
            else:
                staging = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
                shutil.copytree(directory, staging)
                for name in hashes:
                    fsync_path(staging / name)
                os.rename(staging, dest)
            fsync_path(dest.parent)
        except OSError as exc:
            raise StoreError(f"cannot store {prefix}/ in {self.url}: {exc}") from exc
        return hashes

    def get_file(self, key: str, dest: Path, sha256: str | None = None) -> None:
        source = self._path(key)
        try:
            with source.open("rb") as fh, staged_file(dest) as tmp, tmp.open("wb") as out:
                actual, _ = hashing_copy(fh, out)
                verify(actual, sha256, f"{self.url}/{key}")
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"{key} is not in {self.url}") from exc
        except OSError as exc:
            raise StoreError(f"cannot read {key} from {self.url}: {exc}") from exc

    def read_bytes(self, key: str, sha256: str | None = None) -> bytes:
        import hashlib

        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"{key} is not in {self.url}") from exc
        except OSError as exc:
            raise StoreError(f"cannot read {key} from {self.url}: {exc}") from exc
        verify(hashlib.sha256(data).hexdigest(), sha256, f"{self.url}/{key}")
        return data

    def list(self, prefix: str) -> list[ObjectInfo]:
        top = self._path(prefix)
        found = []
        for folder, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name.startswith("."):
                    continue
                path = Path(folder) / name
                try:
                    st = path.stat()
                except OSError:
                    continue
                found.append(ObjectInfo(path.relative_to(self.root).as_posix(), st.st_size, st.st_mtime))
        return sorted(found, key=lambda o: o.key)

    def delete_prefix(self, prefix: str) -> None:
        # Rename first so no reader sees a half-deleted prefix, then delete at leisure.
        path = self._path(prefix)
        doomed = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.deleting")
        try:
            os.rename(path, doomed)
        except OSError:
            return
        shutil.rmtree(doomed, ignore_errors=True)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def remove_debris(self, prefix: str, older_than_s: float) -> list[str]:
        """Hidden staging entries under ``prefix/`` left by a crash mid-write, older than ``older_than_s``."""
        top = self._path(prefix)
        if not top.is_dir():
            return []
        cutoff = time.time() - older_than_s
        removed = []
        for path in top.iterdir():
            try:
                stale = path.name.startswith(".") and path.stat().st_mtime <= cutoff
            except OSError:
                continue
            if stale:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed
