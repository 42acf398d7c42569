"""The artifact store: snapshots, per-version worker state and task archives, each verified by sha256.

``open_store(url, home)`` picks the implementation: ``file://`` (default, FMLORA_HOME) or
``s3://bucket/prefix``.
"""

from .base import ArtifactStore, ObjectInfo
from .file import FileStore
from .s3 import S3Options, S3Store

__all__ = ["ArtifactStore", "FileStore", "ObjectInfo", "S3Options", "S3Store"]
