"""Calling out of and into the engine: metric callbacks that must never fail the work that fires
them, and the engine's coroutines for callers without an event loop."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Concatenate, ParamSpec, Protocol, TypeVar

__all__ = ["blocking", "emit"]

log = logging.getLogger("fmlora.server.core.engine")

T = TypeVar("T")
P = ParamSpec("P")


def emit(callbacks: Sequence[Callable[..., None]], *args: object) -> None:
    for cb in list(callbacks):
        try:
            cb(*args)
        except Exception:  # a metrics hook must never fail a batch or a swap
            log.exception("engine callback %r failed", cb)


class _RunsBlocking(Protocol):
    def _run_blocking(self, coroutine: Coroutine[object, object, T]) -> T: ...


E = TypeVar("E", bound=_RunsBlocking)


def blocking(method: Callable[Concatenate[E, P], Coroutine[object, object, T]]) -> Callable[Concatenate[E, P], T]:
    """``method`` (a coroutine method of the engine) for callers without an event loop."""

    def run(engine: E, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return engine._run_blocking(method(engine, *args, **kwargs))

    run.__name__ = f"{method.__name__}_sync"
    run.__doc__ = (
        f"``{method.__name__}`` for callers without an event loop (scripts, benchmarks, tests): the same "
        "coroutine, run on an event loop thread of the engine's own."
    )
    return run
