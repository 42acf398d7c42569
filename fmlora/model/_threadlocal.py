"""Per-thread switches that survive deepcopy and pickling (threading.local itself does neither)."""

from __future__ import annotations

import threading
from typing import Any


class PerThread:
    """Attribute storage private to each thread; copies start empty."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self._local, name, default)

    def set(self, name: str, value: Any) -> None:
        setattr(self._local, name, value)

    def __deepcopy__(self, memo: dict[int, Any]) -> PerThread:
        return type(self)()

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), ())
