"""Where the registry and its objects live, from two URLs (the server's and the worker's settings).

    FMLORA_REGISTRY_URL   sqlite:///path/registry.db (default: HOME/registry.db)
                          postgresql://user[:password]@host:port/db
    FMLORA_STORE_URL      file:///path (default: HOME)
                          s3://bucket/prefix[?endpoint_url=...&region=...&addressing_style=path]

A malformed URL or refused credentials raise a ConfigError that names the setting, at start-up.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from fmlora.errors import RegistryConfigError, StoreConfigError

from .database import Database
from .store import ArtifactStore, FileStore, S3Options, S3Store

__all__ = ["REGISTRY_SETTING", "STORE_SETTING", "open_database", "open_store", "redact"]

REGISTRY_SETTING = "FMLORA_REGISTRY_URL"
STORE_SETTING = "FMLORA_STORE_URL"
_S3_QUERY = ("endpoint_url", "region", "addressing_style")


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def open_database(url: str | None, home: Path) -> Database:
    """The database ``url`` names (None or empty: SQLite at HOME/registry.db)."""
    if not url:
        from .sqlite import SqliteDatabase

        return SqliteDatabase(home / "registry.db")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        from .sqlite import SqliteDatabase

        path = urlsplit(url).path
        if not url.startswith("sqlite://") or not path or path.endswith("/"):
            raise RegistryConfigError(
                f"{REGISTRY_SETTING}={url!r} is not a SQLite URL; expected sqlite:///path/to/registry.db"
            )
        file = Path(path).expanduser()
        if not file.parent.is_dir():
            raise RegistryConfigError(f"{REGISTRY_SETTING}={url!r}: the folder {file.parent} does not exist")
        return SqliteDatabase(file)
    if scheme in ("postgresql", "postgres"):
        try:
            from psycopg.conninfo import conninfo_to_dict
        except ImportError as exc:
            raise RegistryConfigError(
                f"{REGISTRY_SETTING} names PostgreSQL but psycopg is not installed: pip install 'fmlora[postgres]'"
            ) from exc
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises ValueError on a non-numeric port
            conninfo_to_dict(url)
        except Exception as exc:
            raise RegistryConfigError(
                f"{REGISTRY_SETTING}={redact(url)!r} is not a valid PostgreSQL URL ({exc}); "
                "expected postgresql://user[:password]@host:port/database"
            ) from exc
        if not parts.path.strip("/"):
            raise RegistryConfigError(f"{REGISTRY_SETTING}={redact(url)!r} names no database (…/database at the end)")
        from .postgres import PostgresDatabase

        return PostgresDatabase(url, REGISTRY_SETTING)
    raise RegistryConfigError(
        f"{REGISTRY_SETTING}={redact(url)!r}: unknown scheme {scheme!r}; use sqlite:///path or postgresql://…"
    )


def open_store(url: str | None, home: Path, s3: S3Options | None = None) -> ArtifactStore:
    """The store ``url`` names (None, empty or ``file://``: HOME itself), checked before it is returned."""
    store: ArtifactStore
    if not url or url == "file://":
        store = FileStore(home, STORE_SETTING)
    elif url.startswith("file://"):
        path = urlsplit(url).path
        if not path.startswith("/"):
            raise StoreConfigError(f"{STORE_SETTING}={url!r}: a file URL needs an absolute path (file:///srv/fmlora)")
        store = FileStore(Path(path), STORE_SETTING)
    elif url.startswith("s3://"):
        parts = urlsplit(url)
        if not parts.hostname:
            raise StoreConfigError(f"{STORE_SETTING}={url!r} names no bucket; expected s3://bucket/prefix")
        query = {k: v[-1] for k, v in parse_qs(parts.query, strict_parsing=False).items()}
        unknown = sorted(set(query) - set(_S3_QUERY))
        if unknown or parts.username or parts.password:
            raise StoreConfigError(
                f"{STORE_SETTING}: only {', '.join(_S3_QUERY)} may follow '?' and credentials never go in the URL "
                "(use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
            )
        options = s3 or S3Options()
        options = S3Options(
            **{
                **options.__dict__,
                **{k: v for k, v in query.items() if getattr(options, k) is None},
            }
        )
        try:
            store = S3Store(parts.hostname, parts.path, options, STORE_SETTING)
        except ImportError as exc:
            raise StoreConfigError(
                f"{STORE_SETTING} names S3 but boto3 is not installed: pip install 'fmlora[s3]'"
            ) from exc
        except Exception as exc:  # botocore rejects a malformed endpoint or region at client creation
            raise StoreConfigError(f"{STORE_SETTING}={url!r} cannot be used: {exc}") from exc
    else:
        raise StoreConfigError(f"{STORE_SETTING}={url!r}: unknown scheme; use file:///path or s3://bucket/prefix")
    store.check()
    return store
