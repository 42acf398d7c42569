"""The serving engine: one resident model, a micro-batcher, a version cache and a version source.

    predict ─▶ the version (live, or pinned from the cache) ─▶ validate the prompt against it
            ─▶ resize images (thread pool) ─▶ micro-batcher ─▶ inference thread: activate the batch's
               version (a reference flip) ─▶ forward ─▶ softmax, top-k, prompt info

The model is built once from the registry's ModelConfig and stays on the device; every forward of a
request runs in the one inference thread. A batch holds requests of one version only (the version
entry is the batch key), so a batch runs entirely on one version.

A swap never costs the inference thread more than rebinding references. The version source's thread
(or a loader, for a pinned version) reads the snapshot, verifies it, stages its tensors and lets the
backend prepare it (merged weights computed and a probe batch checked on a shadow of the model,
``server.core.backends.torch``); then it replaces the ``_live`` reference that the next request
reads, and the first batch of that version binds the prepared tensors into the model.
benchmarks/perf.py measures the engine against the bare timm forward, benchmarks/swap.py the swaps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict
from typing import Any, TypeVar

import numpy as np

from fmlora.errors import FmloraError
from fmlora.model.model import FMLoRAModel
from server.core.backends import Backend, make_backend
from server.core.batcher import BatchStats, MicroBatcher
from server.core.calls import blocking, emit
from server.core.config import EngineConfig, resolve_device, resolve_dtype
from server.core.errors import (
    InferenceError,
    NoModelError,
    NotReadyError,
    RequestTimeoutError,
    VersionUnavailableError,
)
from server.core.images import Resizer
from server.core.protocol import BatchCallback, EngineInfo, EngineStats, PromptInput, StagesCallback, SwapCallback
from server.core.request import Item, check_prompt, check_version_number, parse_request, within
from server.core.results import ImageResult, Prediction, answer_batch
from server.core.stages import measuring, timed
from server.core.versions import KnownBadVersionError, RegistryView, VersionCache, VersionEntry
from server.core.watcher import Live, NotifySource, PollingSource, VersionSource, version_of

__all__ = ["Engine", "EngineConfig", "SourceFactory", "resolve_device", "resolve_dtype"]

log = logging.getLogger("fmlora.server.core.engine")

T = TypeVar("T")
# (read the live version, the serving version, swap to a version) -> the source that follows the registry
SourceFactory = Callable[[Callable[[], Live | None], Callable[[], int | None], Callable[[Any], object]], VersionSource]


class Engine:
    """See the module docstring. Implements ``server.core.protocol.ServingEngine``."""

    def __init__(
        self,
        registry: RegistryView,
        config: EngineConfig | None = None,
        *,
        model: FMLoRAModel | None = None,
        source: SourceFactory | None = None,
    ) -> None:
        self.registry = registry
        self.config = config or EngineConfig()
        self._model_arg = model
        self._source_factory = source
        self._lock = threading.RLock()
        self._started = False
        self._ready = False
        self._stopping = False
        self._live: VersionEntry | None = None
        self._backend: Backend | None = None
        self._batcher: MicroBatcher | None = None
        self._cache: VersionCache | None = None
        self._source: VersionSource | None = None
        self._resizer: Resizer | None = None
        self._load_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._sync_loop: asyncio.AbstractEventLoop | None = None
        self._swap_lock = threading.Lock()
        self._inflight = 0  # predictions accepted and not yet answered
        self._inflight_cond = threading.Condition()
        self._batch_callbacks: list[BatchCallback] = []
        self._swap_callbacks: list[SwapCallback] = []
        self._stage_callbacks: list[StagesCallback] = []
        self.swaps_total = 0
        self.swaps_failed = 0
        self.last_swap_seconds: float | None = None
        self.last_swap_at: float | None = None
        self._temperature = float(registry.model_config.prompts.temperature)
        self.input_size: tuple[int, int] | None = None
        self.crop_pct = 1.0

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Build the model, warm it up, load the live version (if any), start the threads."""
        with self._lock:
            if self._started:
                raise RuntimeError("the engine is already started")
            self._started = True
        try:
            self._start()
        except BaseException:
            log.error("the engine failed to start; releasing what it had started")
            self._stopping = True
            self._release(0.0)
            raise

    def _start(self) -> None:
        cfg = self.config
        started = time.perf_counter()
        device = resolve_device(cfg.device)
        model = self._model_arg if self._model_arg is not None else FMLoRAModel(self.registry.model_config)
        if model.config != self.registry.model_config:
            raise ValueError("the model given to the engine was built for another ModelConfig than the registry's")
        backend = self._backend = make_backend(cfg, model, device, resolve_dtype(cfg.dtype, device))
        self.input_size = backend.input_size
        self.crop_pct = cfg.crop_pct if cfg.crop_pct is not None else model.preprocessor.crop_pct
        self._cache = VersionCache(self.registry, backend, capacity=cfg.cached_versions)
        threads = cfg.preprocess_threads or min(8, os.cpu_count() or 1)
        self._resizer = Resizer(backend.input_size, self.crop_pct, threads)
        self._load_pool = concurrent.futures.ThreadPoolExecutor(2, "fmlora-loader")
        self._batcher = MicroBatcher(
            self._run_batch,
            max_batch_size=cfg.max_batch_size,
            max_wait_s=cfg.max_wait_ms / 1000.0,
            max_queue=cfg.max_queue,
            request_timeout_s=cfg.request_timeout_s,
            on_batch=self._emit_batch,
        )
        self._batcher.start()
        sizes = cfg.warmup_batch_sizes
        if sizes is None:
            sizes = (1, cfg.max_batch_size) if device.type == "cuda" and cfg.backend == "torch" else (1,)
        self._batcher.call(lambda: backend.warm_bare(sizes)).result()
        self._load_initial()
        if cfg.follow_registry:
            make_source = self._source_factory or self._polling_source
            self._source = make_source(self.registry.live, lambda: self.serving_version, self._swap_to)
            if cfg.watch:
                self._source.start()
        self._ready = True
        info = backend.describe()
        log.info(
            "engine ready in %.2f s on %s (%s, %s), serving version %s",
            time.perf_counter() - started,
            info["device"],
            info["dtype"],
            info["backend"],
            self.serving_version,
        )

    def _polling_source(
        self, read_live: Callable[[], Live | None], current: Callable[[], int | None], apply: Callable[[Any], object]
    ) -> VersionSource:
        listen = getattr(self.registry, "listen", None)
        notifies = bool(getattr(getattr(self.registry, "db", None), "supports_notify", False))
        if self.config.notify and notifies and listen is not None:
            return NotifySource(read_live, current, apply, listen, self.config.poll_interval_s)
        return PollingSource(read_live, current, apply, self.config.poll_interval_s)

    def _load_initial(self) -> None:
        try:
            live = self.registry.live_version()
        except Exception as exc:
            log.error("cannot read the registry's live version at start: %s", exc)
            return
        if live is None:
            log.info("no version is live yet: predictions answer 503 until a task is learned")
            return
        if self._swap_to(live):
            return
        # The live snapshot is bad on this replica: serve the newest published version that loads.
        try:
            candidates = [
                v.version
                for v in reversed(self.registry.list_versions())
                if v.version != live and v.state in ("live", "retired")
            ]
        except Exception as exc:
            log.error("cannot list versions for a fallback: %s", exc)
            return
        for version in candidates[: self.config.cached_versions]:
            if self._swap_to(version):
                log.warning("live version %d cannot be served; serving version %d instead", live, version)
                return
        log.error("no published version can be served; predictions answer 503")

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop accepting requests, finish the accepted ones (up to ``timeout_s``), stop the threads.

        Call it from a thread other than the event loop that awaits predictions (or use ``astop``):
        the accepted requests need their loop to finish. Returns True when all of them finished.
        """
        with self._lock:
            if not self._started or self._stopping:
                return True
            self._stopping = True
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._inflight_cond:  # after this, every accepted request is counted in _inflight
            self._ready = False
        if self._source is not None:
            self._source.stop()
        with self._inflight_cond:  # requests still resizing or loading a pinned version
            while self._inflight > 0 and time.monotonic() < deadline:
                self._inflight_cond.wait(deadline - time.monotonic())
            drained = self._inflight == 0
        drained = self._release(max(0.0, deadline - time.monotonic())) and drained
        log.info("engine stopped (%s)", "drained" if drained else "queue not drained before the timeout")
        return drained

    def _release(self, timeout_s: float) -> bool:
        """Stop every thread the engine started; True when the batcher finished its queue."""
        if self._source is not None:
            self._source.stop(1.0)
        drained = self._batcher.stop(timeout_s) if self._batcher is not None else True
        if self._resizer is not None:
            self._resizer.close()
        if self._load_pool is not None:
            self._load_pool.shutdown(wait=False, cancel_futures=True)
        if self._sync_loop is not None:
            self._sync_loop.call_soon_threadsafe(self._sync_loop.stop)
        if self._backend is not None:
            self._backend.close()
        return drained

    async def astop(self, timeout_s: float = 30.0) -> bool:
        return await asyncio.get_running_loop().run_in_executor(None, self.stop, timeout_s)

    # -- state ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def serving(self) -> VersionEntry | None:
        return self._live

    @property
    def serving_version(self) -> int | None:
        live = self._live
        return None if live is None else live.version

    @property
    def device(self) -> str:
        return self.describe()["device"]

    def describe(self) -> EngineInfo:
        """Static facts for /info: backend, device, dtype, input size, batching limits."""
        cfg = self.config
        backend = self._backend.describe() if self._backend is not None else None
        info = EngineInfo(
            backend=cfg.backend if backend is None else backend["backend"],
            device=cfg.device if backend is None else backend["device"],
            dtype=cfg.dtype if backend is None else backend["dtype"],
            backbone=self.registry.model_config.backbone.name,
            input_size=None if self.input_size is None else list(self.input_size),
            crop_pct=self.crop_pct,
            merged_adapters=cfg.merge_adapters,
            max_batch_size=cfg.max_batch_size,
            max_wait_ms=cfg.max_wait_ms,
            max_queue=cfg.max_queue,
            request_timeout_s=cfg.request_timeout_s,
            cached_versions=cfg.cached_versions,
        )
        for key in ("onnxruntime", "onnx_graph"):
            if backend is not None and key in backend:
                info[key] = backend[key]  # type: ignore[literal-required]
        return info

    def stats(self) -> EngineStats:
        batch = asdict(self._batcher.stats() if self._batcher is not None else BatchStats())
        backend, source = self._backend, self._source
        return EngineStats(
            ready=self._ready,
            serving_version=self.serving_version,
            swaps_total=self.swaps_total,
            swaps_failed=self.swaps_failed,
            last_swap_seconds=self.last_swap_seconds,
            queue_depth=batch.pop("queue_items"),
            **batch,
            adapter_switches_total=0 if backend is None else backend.switches_total,
            last_adapter_switch_seconds=None if backend is None else backend.last_switch_seconds,
            registry_polls_total=0 if source is None else source.polls_total,
            registry_poll_errors_total=0 if source is None else source.poll_errors_total,
            registry_live_version=None if source is None else source.last_seen,
            versions=None if self._cache is None else self._cache.stats(),
            registry_reachable=True if source is None else source.registry_reachable,
            registry_unreachable_s=None
            if source is None or source.unreachable_since is None
            else round(time.monotonic() - source.unreachable_since, 3),
            serving_since=self.last_swap_at if self._live is not None else None,
            registry_feed="off"
            if source is None
            else "notify"
            if isinstance(source, NotifySource) and source.listening
            else "polling",
        )

    # -- metrics hooks -------------------------------------------------------------------------
    def on_batch(self, callback: BatchCallback) -> None:
        """``callback(size, seconds)`` after every batch (called from the inference thread)."""
        self._batch_callbacks.append(callback)

    def on_swap(self, callback: SwapCallback) -> None:
        """``callback(ok, seconds, version)`` after every swap attempt that loaded something."""
        self._swap_callbacks.append(callback)

    def on_swap_stages(self, callback: StagesCallback) -> None:
        """``callback({stage: seconds})`` after every swap (``server.core.stages``: where it went)."""
        self._stage_callbacks.append(callback)

    def _emit_batch(self, size: int, seconds: float) -> None:
        emit(self._batch_callbacks, size, seconds)

    def _emit_swap(self, ok: bool, seconds: float, version: int | None) -> None:
        emit(self._swap_callbacks, ok, seconds, version)

    # -- swapping ------------------------------------------------------------------------------
    def _swap_to(self, target: Live) -> bool:
        """Load, verify and prepare ``target`` (a version, or its registry row as the version source
        read it) or take it from the cache, in this thread, then make it the serving one: the
        inference thread only ever sees a prepared entry."""
        assert self._cache is not None
        version = version_of(target)
        assert version is not None
        with self._swap_lock, measuring() as clock:
            if self.serving_version == version:
                return True
            started = time.perf_counter()
            try:
                entry = self._cache.load(version, info=None if isinstance(target, int) else target)
            except KnownBadVersionError:
                return False  # refused and counted when it first failed
            except Exception as exc:
                seconds = time.perf_counter() - started
                self.swaps_failed += 1
                if isinstance(exc, (VersionUnavailableError, FmloraError)):
                    log.warning("swap to version %d refused, still serving %s: %s", version, self.serving_version, exc)
                else:
                    log.exception("swap to version %d failed, still serving %s", version, self.serving_version)
                self._emit_swap(False, seconds, version)
                return False
            with timed("swap"):
                self._live = entry  # the swap: the next request reads this reference
                self.last_swap_at = time.time()
                self._cache.protect(version)
            seconds = time.perf_counter() - started
            self.swaps_total += 1
            self.last_swap_seconds = seconds
            stages = dict(clock.seconds)
            log.info("now serving version %d (loaded and prepared in %.3f s: %s)", version, seconds, clock.describe())
        self._emit_swap(True, seconds, version)
        emit(self._stage_callbacks, stages)
        return True

    def reload(self) -> int | None:
        """Admin reload: forget the live version's past failure, look at the registry now, swap if it
        changed. Blocks while a new version loads (call it from a worker thread, or ``areload``)."""
        if not self._ready or self._cache is None:
            raise NotReadyError("the engine is not started")
        if self._source is None:  # told not to follow the registry
            return self.serving_version
        try:
            live = self.registry.live_version()
        except Exception as exc:
            log.warning("reload: cannot read the registry: %s", exc)
            return self.serving_version
        if live is not None:
            self._cache.forget_failure(live)
        self._source.check()
        return self.serving_version

    async def areload(self) -> int | None:
        return await asyncio.get_running_loop().run_in_executor(self._load_pool, self.reload)

    # -- predicting ----------------------------------------------------------------------------
    def _not_ready(self) -> NotReadyError:
        return NotReadyError("the server is shutting down" if self._stopping else "the model is not loaded yet")

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        """Count the request in flight (``stop`` waits for it), or refuse it when not ready."""
        with self._inflight_cond:
            if not self._ready or self._batcher is None:
                raise self._not_ready()
            self._inflight += 1
        try:
            yield
        finally:
            with self._inflight_cond:
                self._inflight -= 1
                if self._inflight == 0:
                    self._inflight_cond.notify_all()

    async def predict(
        self,
        images: Sequence[np.ndarray],
        top_k: int = 5,
        prompt: PromptInput = "auto",
        version: int | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Prediction:
        """Classify ``images`` (uint8 (H, W, 3) arrays of any size) on the live or a pinned version."""
        with self._admitted():
            assert self._batcher is not None and self._resizer is not None
            timeout = self.config.request_timeout_s if timeout_s is None else timeout_s
            deadline = time.monotonic() + timeout
            choice, k = parse_request(images, top_k, prompt)
            entry = self._live if version is None else await self._pinned(version, deadline)
            if entry is None:
                raise NoModelError("no model version is live yet: submit a task and wait for it to be learned")
            check_prompt(entry, choice)
            prepared = await within(self._resizer.prepare(images), deadline)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeoutError(f"the request did not complete within {timeout:g} s")
            results = await self._batcher.run(entry, [Item(image, choice, k) for image in prepared], remaining)
            return Prediction(entry.version, entry.sha256, results)

    async def _pinned(self, version: int, deadline: float) -> VersionEntry:
        assert self._cache is not None
        cached = self._cache.get(check_version_number(version))
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        return await within(loop.run_in_executor(self._load_pool, self._load_pinned, version), deadline)

    def _load_pinned(self, version: int) -> VersionEntry:
        assert self._cache is not None
        return self._cache.load(version, self.registry.get_version(version).sha256)  # unknown: 404

    def _run_blocking(self, coroutine: Coroutine[object, object, T]) -> T:
        if not self._ready:
            coroutine.close()
            raise self._not_ready()
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop_for_sync_callers()).result()

    predict_sync = blocking(predict)

    def _loop_for_sync_callers(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._sync_loop is None:
                loop = asyncio.new_event_loop()

                def run() -> None:
                    loop.run_forever()
                    loop.close()

                threading.Thread(target=run, name="fmlora-sync-predict", daemon=True).start()
                self._sync_loop = loop
            return self._sync_loop

    # -- the inference thread ------------------------------------------------------------------
    def _run_batch(self, entry: VersionEntry, items: list[Item]) -> list[ImageResult]:
        assert self._backend is not None
        self._backend.activate(entry)
        choices = [it.choice for it in items]
        logits, query = self._backend.forward(np.stack([it.image for it in items]), choices)
        if tuple(logits.shape) != (len(items), len(entry.labels)):
            raise InferenceError("the model returned logits that do not match the batch")
        return answer_batch(
            entry,
            logits,
            query,
            choices,
            [it.top_k for it in items],
            temperature=self._temperature,
            weights_top=self.config.prompt_weights_top,
        )
