"""Ordered schema migrations, one folder of SQL files per dialect (``NNNN_name.sql``).

A file is applied once, in order, inside the transaction that records its number in the
``schema_version`` table. Never edit a shipped file: add the next one, to both dialects, with the
same number.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["DIALECTS", "load", "statements"]

DIALECTS = ("sqlite", "postgresql")


def load(dialect: str) -> list[tuple[int, str, str]]:
    """(number, name, SQL) of every migration of ``dialect``, in order; numbers run 1, 2, ... without gaps."""
    if dialect not in DIALECTS:
        raise ValueError(f"no migrations for dialect {dialect!r}")
    folder = resources.files(__package__).joinpath(dialect)
    found = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    result = []
    for expected, name in enumerate(found, start=1):
        number = int(name.split("_", 1)[0])
        if number != expected:
            raise ValueError(f"migration {dialect}/{name} is out of sequence (expected number {expected})")
        result.append((number, name, folder.joinpath(name).read_text(encoding="utf-8")))
    return result


def statements(sql: str) -> list[str]:
    """The statements of one file (no statement of ours holds ';' inside a literal)."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
