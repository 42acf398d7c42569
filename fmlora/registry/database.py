"""What the registry needs from a database, and the logic both backends share.

The registry's SQL is written once, with ``?`` placeholders, in the subset that SQLite and
PostgreSQL read alike; a backend translates placeholders, maps its driver's exceptions onto the
FmloraError tree (a unique-key violation is ``DuplicateKeyError`` on both) and supplies the two
transaction kinds:

- ``read()``: statements that see committed data; no locks held.
- ``write()``: one transaction in which every multi-step change (claim a task, publish, activate,
  renew a lease) runs. Writers are serialised: SQLite's ``BEGIN IMMEDIATE`` takes the database's
  write lock, PostgreSQL takes one transaction-scoped advisory lock first. Serial writers make each
  read-then-write in a transaction as safe as SERIALIZABLE without retry loops, and the registry's
  writes are few (submissions, progress, lease beats), so the lock is never contended for long.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from fmlora.errors import RegistryError

from . import migrations
from .records import now_iso

__all__ = ["Database", "Row", "Tx"]

Row = Mapping[str, Any]
VERSIONS_CHANNEL = "fmlora_versions"


class Tx(ABC):
    """One connection inside a read or a write; every call maps driver errors to FmloraErrors."""

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; return the number of rows it changed."""

    @abstractmethod
    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run a query; return every row (mappings by column name)."""

    def row(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        found = self.rows(sql, params)
        return found[0] if found else None

    def value(self, sql: str, params: Sequence[Any] = ()) -> Any:
        found = self.row(sql, params)
        return None if found is None else next(iter(found.values()))

    def notify(self, channel: str, payload: str) -> None:  # noqa: B027 - a no-op where unsupported
        """Tell listeners about a change once this transaction commits (a no-op where unsupported)."""


class Database(ABC):
    """A registry database; see the module docstring for what each method promises."""

    dialect: str
    # An SQL expression for "now" in seconds since the epoch on the DATABASE's clock: leases are
    # compared with it, so workers on hosts whose clocks disagree still agree on who holds a lease.
    now_sql: str
    display: str  # where the database is, safe to print (no password)
    supports_notify = False

    @abstractmethod
    def read(self) -> AbstractContextManager[Tx]: ...

    @abstractmethod
    def write(self) -> AbstractContextManager[Tx]: ...

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections (a pool); the database stays usable by others."""

    def listen(self, channel: str, timeout_s: float) -> Iterator[str]:
        """Payloads NOTIFYed on ``channel`` until the caller stops iterating; yields ``""`` every
        ``timeout_s`` without one, so a caller can check for shutdown. Only where ``supports_notify``."""
        raise RegistryError(f"{self.dialect} has no change notifications; poll live_version() instead")

    # -- schema --------------------------------------------------------------------------------
    def _legacy_version(self, tx: Tx) -> int:
        """The schema version of a database made before the schema_version table existed."""
        return 0

    def _prepare(self) -> None:  # noqa: B027 - nothing to prepare by default
        """Settings that must be in place before the first transaction (e.g. SQLite's WAL mode)."""

    def migrate(self) -> int:
        """Bring the schema up to date in one write transaction; return its version."""
        self._prepare()
        steps = migrations.load(self.dialect)
        with self.write() as tx:
            tx.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            current = tx.value("SELECT MAX(version) FROM schema_version")
            if current is None:
                current = self._legacy_version(tx)
                for number in range(1, current + 1):
                    tx.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (number, now_iso()))
            if current > len(steps):
                raise RegistryError(
                    f"the registry database {self.display} has schema {current}, newer than this fmlora "
                    f"({len(steps)}); upgrade fmlora"
                )
            for number, _name, sql in steps[current:]:
                for statement in migrations.statements(sql):
                    tx.execute(statement)
                tx.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (number, now_iso()))
            return len(steps)

    def schema_version(self) -> int:
        with self.read() as tx:
            return int(tx.value("SELECT MAX(version) FROM schema_version") or 0)


_PLACEHOLDER = re.compile(r"\?")


def pyformat(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled)."""
    return _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))
