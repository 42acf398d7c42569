"""The version change feed: what a server replica watches to learn of publish, activate and rollback.

On PostgreSQL the registry NOTIFYs ``fmlora_versions`` inside the transaction that moves the live
pointer, with a JSON payload ``{"event": "published"|"activated", "version", "live", "previous"}``;
``notifications`` yields those payloads as they commit (``None`` every ``timeout_s`` without one, so
the caller can check for shutdown). Notifications can be missed while the connection is down, so a
watcher keeps polling ``live_version()`` as the fallback (and polls only, on SQLite).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .database import VERSIONS_CHANNEL

if TYPE_CHECKING:
    from .registry import Registry

__all__ = ["VERSIONS_CHANNEL", "notifications", "supports_notifications"]


def supports_notifications(registry: Registry) -> bool:
    return registry.db.supports_notify


def notifications(registry: Registry, timeout_s: float = 1.0) -> Iterator[dict[str, Any] | None]:
    """Version-change payloads as they commit; raises ``RegistryUnavailableError`` when the connection
    drops (reconnect by calling again) and ``RegistryError`` on a backend without notifications."""
    for payload in registry.db.listen(VERSIONS_CHANNEL, timeout_s):
        yield json.loads(payload) if payload else None
