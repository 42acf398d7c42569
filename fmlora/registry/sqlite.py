"""The embedded backend: one SQLite file in WAL mode (many readers across processes, one writer)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fmlora.errors import DuplicateKeyError, RegistryError, RegistryUnavailableError

from .database import Database, Row, Tx

__all__ = ["SqliteDatabase"]


def _mapped(exc: sqlite3.Error, where: str) -> RegistryError:
    if isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc).upper():
        return DuplicateKeyError(f"a row with that key already exists ({exc})")
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return RegistryUnavailableError(f"the registry database {where} stayed locked: {exc}")
    return RegistryError(f"registry database error in {where}: {exc}")


class _SqliteTx(Tx):
    def __init__(self, conn: sqlite3.Connection, where: str):
        self.conn = conn
        self.where = where

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        try:
            return self.conn.execute(sql, tuple(params)).rowcount
        except sqlite3.Error as exc:
            raise _mapped(exc, self.where) from exc

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        try:
            return [dict(r) for r in self.conn.execute(sql, tuple(params)).fetchall()]
        except sqlite3.Error as exc:
            raise _mapped(exc, self.where) from exc


class SqliteDatabase(Database):
    dialect = "sqlite"
    now_sql = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: Path):
        self.path = path
        self.display = str(path)

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open the registry database {self.path}: {exc}") from exc
        return conn

    @contextmanager
    def read(self) -> Iterator[Tx]:
        conn = self._connect()
        try:
            yield _SqliteTx(conn, self.display)
        finally:
            conn.close()

    @contextmanager
    def write(self) -> Iterator[Tx]:
        conn = self._connect()
        tx = _SqliteTx(conn, self.display)
        try:
            tx.execute("BEGIN IMMEDIATE")
            try:
                yield tx
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            tx.execute("COMMIT")
        finally:
            conn.close()

    def _prepare(self) -> None:
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.Error as exc:
            raise _mapped(exc, self.display) from exc
        finally:
            conn.close()

    def _legacy_version(self, tx: Tx) -> int:
        # Homes made before the schema_version table counted their schema in PRAGMA user_version.
        return int(tx.value("PRAGMA user_version") or 0)
