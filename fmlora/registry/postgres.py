"""The PostgreSQL backend: a psycopg 3 connection pool shared by every Registry in the process.

Writers are serialised by one transaction-scoped advisory lock (see ``database``), in READ
COMMITTED: each statement after the lock sees every transaction committed before it, which is what
the read-then-write steps need (REPEATABLE READ would have fixed its snapshot before the lock wait).
Publish and activate NOTIFY ``fmlora_versions`` inside their transaction, so listeners hear of a
version only once it is committed.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from fmlora.errors import DuplicateKeyError, RegistryConfigError, RegistryError, RegistryUnavailableError

from .database import Database, Row, Tx, pyformat

__all__ = ["PostgresDatabase", "close_pools"]

# Any fixed 64-bit key: every fmlora writer on this database takes the same one.
_WRITE_LOCK = 0x666D6C6F7261
_CONNECT_TIMEOUT_S = 5
# How long a caller waits for a connection before RegistryUnavailableError: short, so a server can
# answer "unavailable" (and keep serving the version it holds) instead of queueing requests.
_POOL_TIMEOUT_S = 5.0
_pools: dict[str, ConnectionPool] = {}
_pools_lock = threading.Lock()


def _mapped(exc: Exception, where: str) -> RegistryError:
    if isinstance(exc, pg_errors.UniqueViolation):
        return DuplicateKeyError(f"a row with that key already exists ({exc.diag.constraint_name})")
    if isinstance(exc, (psycopg.OperationalError, PoolTimeout)):
        return RegistryUnavailableError(f"the registry database {where} cannot be reached: {exc}")
    return RegistryError(f"registry database error in {where}: {exc}")


class _PostgresTx(Tx):
    def __init__(self, conn: psycopg.Connection[Any], where: str):
        self.conn = conn
        self.where = where

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        try:
            return self.conn.execute(pyformat(sql), tuple(params)).rowcount  # type: ignore[arg-type]
        except psycopg.Error as exc:
            raise _mapped(exc, self.where) from exc

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        try:
            return list(self.conn.execute(pyformat(sql), tuple(params)).fetchall())  # type: ignore[arg-type]
        except psycopg.Error as exc:
            raise _mapped(exc, self.where) from exc

    def notify(self, channel: str, payload: str) -> None:
        self.execute("SELECT pg_notify(?, ?)", (channel, payload))


def _display(conninfo: str) -> str:
    parts = conninfo_to_dict(conninfo)
    parts.pop("password", None)
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


def probe(conninfo: str, setting: str) -> None:
    """Connect once, so that a wrong URL or credentials fail at start-up with a message naming the setting."""
    where = _display(conninfo)
    try:
        with psycopg.connect(conninfo, connect_timeout=_CONNECT_TIMEOUT_S) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        text = str(exc)
        if any(
            marker in text
            for marker in ("authentication failed", "does not exist", "no password supplied", "not permitted")
        ):
            raise RegistryConfigError(
                f"{setting} ({where}) is refused by the server: {text.strip()}; check the user, password and database"
            ) from exc
        raise RegistryUnavailableError(f"{setting} ({where}) cannot be reached: {text.strip()}") from exc
    except psycopg.Error as exc:
        raise RegistryConfigError(f"{setting} ({where}) cannot be used: {exc}") from exc


def _pool(conninfo: str) -> ConnectionPool:
    with _pools_lock:
        pool = _pools.get(conninfo)
        if pool is None or pool.closed:
            pool = ConnectionPool(
                conninfo,
                min_size=1,
                max_size=8,
                kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": _CONNECT_TIMEOUT_S},
                # A connection that died with a database restart is replaced, not handed out.
                check=ConnectionPool.check_connection,
                timeout=_POOL_TIMEOUT_S,
                name="fmlora-registry",
                open=False,
            )
            pool.open(wait=False)
            _pools[conninfo] = pool
        return pool


def close_pools(conninfo: str | None = None) -> None:
    """Close the pool of ``conninfo`` (all pools when None); the next use opens a new one."""
    with _pools_lock:
        doomed = [c for c in _pools if conninfo is None or c == conninfo]
        pools = [_pools.pop(c) for c in doomed]
    for pool in pools:
        pool.close()


atexit.register(close_pools)


class PostgresDatabase(Database):
    dialect = "postgresql"
    now_sql = "EXTRACT(EPOCH FROM clock_timestamp())::float8"
    supports_notify = True

    def __init__(self, conninfo: str, setting: str = "FMLORA_REGISTRY_URL"):
        self.conninfo = make_conninfo(conninfo)
        self.display = _display(self.conninfo)
        probe(self.conninfo, setting)

    @property
    def pool(self) -> ConnectionPool:
        return _pool(self.conninfo)

    @contextmanager
    def read(self) -> Iterator[Tx]:
        try:
            with self.pool.connection() as conn:
                yield _PostgresTx(conn, self.display)
        except (psycopg.Error, PoolTimeout) as exc:
            raise _mapped(exc, self.display) from exc

    @contextmanager
    def write(self) -> Iterator[Tx]:
        try:
            with self.pool.connection() as conn, conn.transaction():
                tx = _PostgresTx(conn, self.display)
                tx.execute("SELECT pg_advisory_xact_lock(?)", (_WRITE_LOCK,))
                yield tx
        except (psycopg.Error, PoolTimeout) as exc:
            raise _mapped(exc, self.display) from exc

    def close(self) -> None:
        close_pools(self.conninfo)

    def listen(self, channel: str, timeout_s: float) -> Iterator[str]:
        try:
            with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S) as conn:
                conn.execute(f"LISTEN {channel}")
                while True:
                    got = False
                    for note in conn.notifies(timeout=timeout_s):
                        got = True
                        yield note.payload
                    if not got:
                        yield ""
        except psycopg.Error as exc:
            raise _mapped(exc, self.display) from exc
