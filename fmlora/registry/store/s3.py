"""``s3://bucket/prefix``: objects in an S3-compatible bucket (AWS, MinIO, Ceph, ...), through boto3.

Endpoint, region and credentials come from ``S3Options`` (the server's settings) or else boto3's
standard sources (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, profiles, instance roles). Uploads stream from a file (multipart above
8 MiB); downloads stream to a file and are hashed on the way.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmlora.errors import ObjectNotFoundError, StoreConfigError, StoreError, StoreUnavailableError

from .base import CHUNK, ArtifactStore, ObjectInfo, check_key, sha256_of, staged_file, verify

__all__ = ["S3Options", "S3Store"]

_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken", "ExpiredToken"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


@dataclass(frozen=True)
class S3Options:
    """Explicit settings; None leaves a value to boto3's standard sources."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    addressing_style: str | None = None  # "path" for MinIO and most self-hosted endpoints
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_attempts: int = 3


class S3Store(ArtifactStore):
    def __init__(self, bucket: str, prefix: str, options: S3Options | None = None, setting: str = "FMLORA_STORE_URL"):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.options = options or S3Options()
        self.setting = setting
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        o = self.options
        config = Config(
            connect_timeout=o.connect_timeout_s,
            read_timeout=o.read_timeout_s,
            retries={"max_attempts": o.max_attempts, "mode": "standard"},
            s3={"addressing_style": o.addressing_style} if o.addressing_style else None,
        )
        session = boto3.session.Session(
            aws_access_key_id=o.access_key_id, aws_secret_access_key=o.secret_access_key, region_name=o.region
        )
        self.client = session.client("s3", endpoint_url=o.endpoint_url, config=config)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # started by the first get_files
        self._pool_lock = threading.Lock()

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: Exception, what: str) -> StoreError:
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreConfigError(
                f"{self.setting} ({self.url}): no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            )
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _AUTH_CODES:
                return StoreConfigError(
                    f"{self.setting} ({self.url}): the S3 endpoint refused the credentials ({code}); "
                    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy"
                )
            if code == "NoSuchBucket":
                return StoreConfigError(f"{self.setting} ({self.url}): bucket {self.bucket!r} does not exist")
            if code in _MISSING_CODES:
                return ObjectNotFoundError(f"{what} is not in {self.url}")
            if code.startswith("5") or code in {"SlowDown", "ServiceUnavailable", "InternalError"}:
                return StoreUnavailableError(f"{self.url} failed {what}: {code}")
            return StoreError(f"{self.url} refused {what}: {code}")
        if isinstance(exc, (ConnectionError, HTTPClientError)):
            return StoreUnavailableError(f"{self.setting} ({self.url}) cannot be reached during {what}: {exc}")
        return StoreError(f"{self.url} failed {what}: {exc}")

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, what) from exc

    def check(self) -> None:
        try:
            self._call("a check of the bucket", self.client.head_bucket, Bucket=self.bucket)
        except ObjectNotFoundError as exc:  # HEAD has no body: a missing bucket is a bare 404
            raise StoreConfigError(f"{self.setting} ({self.url}): bucket {self.bucket!r} does not exist") from exc

    def put_file(self, key: str, path: Path, *, consume: bool = False) -> str:
        sha256 = sha256_of(path)
        self._call(
            f"storing {key}",
            self.client.upload_file,
            str(path),
            self.bucket,
            self._key(key),
            ExtraArgs={"Metadata": {"sha256": sha256}},
        )
        if consume:
            path.unlink(missing_ok=True)
        return sha256

    def put_dir(self, prefix: str, directory: Path, *, consume: bool = False) -> dict[str, str]:
        # The manifest (adapter_config.json) last, so a reader that lists the prefix early finds the
        # tensor file before it; visibility itself comes from the registry row written after this.
        files = sorted((p for p in directory.iterdir() if p.is_file()), key=lambda p: (p.suffix == ".json", p.name))
        return {p.name: self.put_file(f"{prefix}/{p.name}", p, consume=consume) for p in files}

    def get_file(self, key: str, dest: Path, sha256: str | None = None) -> None:
        response = self._call(f"reading {key}", self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        digest = hashlib.sha256()
        body = response["Body"]
        with staged_file(dest) as tmp, tmp.open("wb") as out:
            try:
                for block in body.iter_chunks(CHUNK):
                    digest.update(block)
                    out.write(block)
            except Exception as exc:
                raise StoreUnavailableError(f"{self.url}: reading {key} broke off: {exc}") from exc
            finally:
                body.close()
            verify(digest.hexdigest(), sha256, f"{self.url}/{key}")

    def get_files(self, files: Mapping[str, tuple[Path, str | None]]) -> None:
        # A version is a few small objects: each GET is a round trip, so they are sent together (the
        # client is thread-safe) and a version arrives in the time of its slowest object.
        items = list(files.items())
        if len(items) < 2:
            super().get_files(files)
            return
        pool = self._fetch_pool()
        futures = [pool.submit(self.get_file, key, dest, sha256) for key, (dest, sha256) in items[1:]]
        errors = []
        key, (dest, sha256) = items[0]
        try:
            self.get_file(key, dest, sha256)
        except Exception as exc:
            errors.append(exc)
        for future in futures:
            exc = future.exception()
            if exc is not None:
                errors.append(exc)
        if errors:
            raise errors[0]

    def _fetch_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="fmlora-s3")
            return self._pool

    def read_bytes(self, key: str, sha256: str | None = None) -> bytes:
        response = self._call(f"reading {key}", self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        try:
            data = response["Body"].read()
        except Exception as exc:
            raise StoreUnavailableError(f"{self.url}: reading {key} broke off: {exc}") from exc
        verify(hashlib.sha256(data).hexdigest(), sha256, f"{self.url}/{key}")
        return data

    def list(self, prefix: str) -> list[ObjectInfo]:
        full = self._key(prefix) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        found = []
        pages = self._call(
            f"listing {prefix}/", self.client.get_paginator("list_objects_v2").paginate, Bucket=self.bucket, Prefix=full
        )
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    found.append(ObjectInfo(item["Key"][strip:], int(item["Size"]), item["LastModified"].timestamp()))
        except Exception as exc:
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(exc, (BotoCoreError, ClientError)):
                raise self._error(exc, f"listing {prefix}/") from exc
            raise
        return sorted(found, key=lambda o: o.key)

    def delete_prefix(self, prefix: str) -> None:
        keys = [self._key(o.key) for o in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self._call(f"deleting {prefix}/", self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch})

    def delete(self, key: str) -> None:
        self._call(f"deleting {key}", self.client.delete_object, Bucket=self.bucket, Key=self._key(key))
