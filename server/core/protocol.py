"""The engine seam: what the HTTP layer (and any other host) holds the serving engine by.

``server.core.engine.Engine`` implements ``ServingEngine``; tests of the HTTP layer implement it
with a fake. Everything an engine reports is typed here, so a host needs no ``getattr`` fallbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Protocol, TypedDict

import numpy as np
from typing_extensions import NotRequired

from fmlora.model.prompts import PromptChoice
from server.core.results import Prediction
from server.core.versions import CacheStats

__all__ = [
    "BatchCallback",
    "EngineInfo",
    "EngineStats",
    "PromptInput",
    "ServedVersion",
    "ServingEngine",
    "StagesCallback",
    "SwapCallback",
]

PromptInput = PromptChoice | str | Mapping[str, str]  # 'auto', 'none', {'task': NAME}
BatchCallback = Callable[[int, float], None]  # (images in the batch, seconds)
SwapCallback = Callable[[bool, float, int | None], None]  # (swapped, seconds, version)
StagesCallback = Callable[[Mapping[str, float]], None]  # {stage: seconds} of one swap (server.core.stages)


class EngineInfo(TypedDict):
    """Static facts for /info and /metrics."""

    backend: str
    device: str
    dtype: str
    backbone: str
    input_size: list[int] | None  # None before the model is built
    crop_pct: float
    merged_adapters: bool
    max_batch_size: int
    max_wait_ms: float
    max_queue: int
    request_timeout_s: float
    cached_versions: int
    onnxruntime: NotRequired[str]
    onnx_graph: NotRequired[str]


class EngineStats(TypedDict):
    ready: bool
    serving_version: int | None
    swaps_total: int  # versions swapped in (rollbacks included)
    swaps_failed: int  # versions refused: their snapshot failed to load, verify or prepare
    last_swap_seconds: float | None  # load, verify and prepare of the last swap (off the request path)
    queue_depth: int  # images waiting for the model
    queue_requests: int
    batches_total: int
    items_total: int
    requests_total: int
    rejected_total: int
    timeouts_total: int
    errors_total: int
    last_batch_size: int
    last_batch_seconds: float
    mean_batch_size: float
    throughput_items_per_s: float
    adapter_switches_total: int  # activations in the inference thread (reference flips)
    last_adapter_switch_seconds: float | None
    registry_polls_total: int
    registry_poll_errors_total: int
    registry_live_version: int | None
    versions: CacheStats | None
    # False while the last read of the registry failed (the database is down); the replica keeps serving.
    registry_reachable: NotRequired[bool]
    registry_unreachable_s: NotRequired[float | None]  # for how long, in seconds
    registry_feed: NotRequired[Literal["notify", "polling", "off"]]  # how the replica learns of new versions
    serving_since: NotRequired[float | None]  # time.time() of the swap to the serving version


class ServedVersion(Protocol):
    """The version an engine serves (``server.core.versions.VersionEntry`` fits)."""

    @property
    def version(self) -> int: ...

    @property
    def sha256(self) -> str: ...

    @property
    def labels(self) -> Sequence[str]: ...

    @property
    def task_names(self) -> Sequence[str]: ...


class ServingEngine(Protocol):
    @property
    def ready(self) -> bool: ...

    @property
    def serving(self) -> ServedVersion | None:
        """The version that unpinned requests get now (read it once: a swap may replace it)."""

    @property
    def serving_version(self) -> int | None: ...

    def start(self) -> None:
        """Build and warm the model, load the live version; blocks (run it in a worker thread)."""

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop accepting, finish accepted requests (up to ``timeout_s``); True when all finished."""

    async def predict(
        self,
        images: Sequence[np.ndarray],
        top_k: int = 5,
        prompt: PromptInput = "auto",
        version: int | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Prediction: ...

    def reload(self) -> int | None:
        """Look at the registry now and swap if the live version changed; returns what is served.
        Blocks while a version loads (run it in a worker thread)."""

    def describe(self) -> EngineInfo: ...

    def stats(self) -> EngineStats: ...

    def on_batch(self, callback: BatchCallback) -> None: ...

    def on_swap(self, callback: SwapCallback) -> None: ...

    def on_swap_stages(self, callback: StagesCallback) -> None: ...
