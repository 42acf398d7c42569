"""Where a swap's time goes: seconds per stage, from reading the registry to the reference flip.

A swap crosses three layers (the version source reads the registry, the version cache fetches and
reads the snapshot, the backend prepares and probes it), so the clock travels with the thread rather
than through every signature: ``measuring()`` opens one for the calling thread (or joins the one
already open there), and ``timed(stage)`` adds to it. A stage nested in another is subtracted from
the outer one (the probe inside prepare), so the stages of one swap add up to its duration. Outside
``measuring()`` (a pinned request's load, the tests' fakes) ``timed`` costs one attribute lookup.

Stages: ``registry`` (the version's row), ``fetch`` (objects from the store into this host's cache,
sha256 checked on the way, or the cached copy re-hashed), ``read`` (the snapshot read back: sha256 of
the bytes parsed, safetensors parse, finiteness), ``check`` (compatible with the resident model),
``stage`` (tensors on the serving device and dtype), ``prepare`` (merged weights in the shadow),
``probe`` (a forward that must give finite outputs), ``swap`` (the flip).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["STAGES", "StageClock", "measuring", "timed"]

STAGES = ("registry", "fetch", "read", "check", "stage", "prepare", "probe", "swap")

_local = threading.local()


class StageClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open stage: time spent in stages nested in it

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            spent = time.perf_counter() - started
            nested = self._inner.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + spent - nested
            if self._inner:
                self._inner[-1] += spent

    def total(self) -> float:
        return sum(self.seconds.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in self.seconds.items())


@contextmanager
def measuring() -> Iterator[StageClock]:
    """The calling thread's clock: a new one, or the one an outer ``measuring()`` opened."""
    clock: StageClock | None = getattr(_local, "clock", None)
    if clock is not None:
        yield clock
        return
    clock = _local.clock = StageClock()
    try:
        yield clock
    finally:
        _local.clock = None


@contextmanager
def timed(stage: str) -> Iterator[None]:
    clock: StageClock | None = getattr(_local, "clock", None)
    if clock is None:
        yield
        return
    with clock.stage(stage):
        yield
