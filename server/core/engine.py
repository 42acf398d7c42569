"""The serving engine: one resident model, a micro-batcher, a version cache and a registry watcher.

    predict ─▶ resolve the version (live, or pinned from the cache) ─▶ validate the prompt against it
            ─▶ resize images (thread pool) ─▶ micro-batcher ─▶ inference thread: activate the batch's
               version (pre-staged tensors, between batches) ─▶ forward ─▶ softmax, top-k, prompt info

The model is built once from the registry's ModelConfig and stays on the device. Every model call
(forward, adapter switch, warm-up) happens in the one inference thread, under ``torch.inference_mode``
for forwards. A batch holds requests of one version only (the version entry is the batch key), so a
batch runs entirely on one version; a swap replaces the ``_live`` reference that the next request
reads. Versions are loaded, verified and warmed on the side (``VersionCache``) before they serve.

Adapters are merged into the frozen weights by default (W0 + ΔW per adapted matrix, recomputed in
the inference thread when the batch's version changes, ~2 ms for the offline ViT and ~30 ms for a
ViT-S/16 on one CPU thread): a merged qkv costs what the bare layer costs, while the unmerged
low-rank path measured 10-20 % slower at batch 8-32 on CPU. ``EngineConfig(merge_adapters=False)``
keeps them apart (cheaper switches when pinned versions alternate batch by batch).
benchmarks/perf.py measures the engine against the bare timm forward.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.nn import functional as F

from fmlora.errors import FmloraError, UnknownTaskError, VersionNotFoundError
from fmlora.model.model import FMLoRAModel, TaskRecord
from fmlora.model.prompts import PromptChoice
from fmlora.model.snapshot import Snapshot, check_compatible
from server.core.batcher import MicroBatcher
from server.core.errors import (
    InferenceError,
    InvalidImageInput,
    InvalidRequestError,
    NoModelError,
    NotReadyError,
    RequestTimeoutError,
    VersionUnavailableError,
)
from server.core.images import as_rgb_array, resize_for_model
from server.core.versions import KnownBadVersionError, SnapshotWarmupError, VersionCache, VersionEntry
from server.core.watcher import RegistryWatcher

__all__ = [
    "Engine",
    "EngineConfig",
    "ImageResult",
    "InvalidRequestError",
    "Prediction",
    "TorchBackend",
    "model_crop_pct",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger("fmlora.server.core.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:N"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    max_batch_size: int = 32  # images per batch
    max_wait_ms: float = 5.0
    max_queue: int = 256  # images waiting
    request_timeout_s: float = 30.0
    cached_versions: int = 4
    poll_interval_s: float = 0.5
    backend: Literal["torch", "onnx"] = "torch"
    merge_adapters: bool = True
    # Centre-crop fraction when resizing to the model's input size. None: the model's timm data config
    # value (capped at 1), which is what the worker trains with (fmlora.worker.worker._image_set).
    crop_pct: float | None = None
    watch: bool = True  # poll the registry's live pointer in a thread
    warmup_batch_sizes: tuple[int, ...] | None = None  # None: (1,) on CPU, (1, max_batch_size) on GPU
    preprocess_threads: int | None = None  # resize workers; None: min(8, CPU count)
    prompt_weights_top: int = 5  # tasks listed in each result's prompt weights
    onnx_dir: str | None = None  # where exported graphs are cached (backend="onnx"); default: a temp dir

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1 or self.cached_versions < 1:
            raise ValueError("max_batch_size, max_queue and cached_versions must be >= 1")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0 or self.poll_interval_s <= 0:
            raise ValueError("max_wait_ms must be >= 0; request_timeout_s and poll_interval_s > 0")
        if self.backend not in ("torch", "onnx"):
            raise ValueError(f"backend must be 'torch' or 'onnx', got {self.backend!r}")
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {self.dtype!r}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError("crop_pct must be in (0, 1]")
        if (self.preprocess_threads is not None and self.preprocess_threads < 1) or self.prompt_weights_top < 0:
            raise ValueError("preprocess_threads must be >= 1 and prompt_weights_top >= 0")


@dataclass(frozen=True)
class ImageResult:
    """One image's answer: top-k ``{label, score, task}`` and the meta-prompt used
    (``{mode, task, weights}``; weights: the prompt query's affinity to each learned task's key,
    softmax over tasks, the highest few by task name)."""

    predictions: list[dict[str, Any]]
    prompt: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"predictions": [dict(p) for p in self.predictions], "prompt": dict(self.prompt)}


@dataclass(frozen=True)
class Prediction:
    model_version: int | None
    snapshot_sha256: str | None
    results: list[ImageResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "snapshot_sha256": self.snapshot_sha256,
            "results": [r.to_dict() for r in self.results],
        }


@dataclass(frozen=True)
class _Item:
    image: np.ndarray  # uint8 (H, W, 3) at the model's input size
    choice: PromptChoice
    top_k: int


def model_crop_pct(model: FMLoRAModel) -> float:
    """The centre-crop fraction training uses for this model: timm's data config value, capped at 1."""
    return model.preprocessor.crop_pct


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class TorchBackend:
    """The resident FMLoRAModel on its device and dtype; every method but ``check``/``stage`` runs in
    the inference thread."""

    name = "torch"

    def __init__(self, model: FMLoRAModel, device: torch.device, dtype: torch.dtype, merge: bool) -> None:
        self.model = model.eval().to(device=device, dtype=dtype)
        self.device = device
        self.dtype = dtype
        self.input_size: tuple[int, int] = tuple(model.preprocessor.input_size)  # type: ignore[assignment]
        self.merge = merge
        if merge:
            self.model.merge()
        pre = model.preprocessor
        # The data config's mean/std on the device, so normalisation runs where the model does.
        self._mean = torch.tensor(pre.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self._std = torch.tensor(pre.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.loaded: VersionEntry | None = None
        self.switches_total = 0
        self.last_switch_seconds: float | None = None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", "")}

    # -- versions (any thread) ---------------------------------------------------------------
    def check(self, snapshot: Snapshot) -> None:
        check_compatible(snapshot, self.model)

    def stage(self, snapshot: Snapshot) -> dict[str, torch.Tensor]:
        return {k: v.to(device=self.device, dtype=self.dtype) for k, v in snapshot.tensors.items()}

    def prepare_entry(self, entry: VersionEntry) -> None:
        """Backend-specific preparation of a verified entry (nothing for torch)."""

    # -- inference thread --------------------------------------------------------------------
    def activate(self, entry: VersionEntry) -> None:
        if self.loaded is entry:
            return
        started = time.perf_counter()
        self.loaded = None  # a failure below leaves no claim about the model's state
        with torch.no_grad():
            self.model.load_adapter_state(dict(entry.tensors), entry.tasks, entry.labels, entry.label_tasks)
        self.loaded = entry
        self.switches_total += 1
        self.last_switch_seconds = time.perf_counter() - started

    def invalidate(self) -> None:
        self.loaded = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) at the input size → the model's float input, on the device.

        Equal to ``model.preprocessor`` (tested) but with the constants already on the device."""
        pre = self.model.preprocessor
        if pre.input_norm == "timm":
            return (images.float().div_(255.0) - self._mean) / self._std
        return pre(images)  # per-image standardisation: no constant tensors, runs on any device

    def forward(self, images: np.ndarray, choices: list[PromptChoice]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, H, W, 3) uint8 → (logits (N, C), prompt query (N, D) or None)."""
        x = torch.from_numpy(images).to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            out = self.model.forward_detailed(self.normalize(x), choices)
        return out.logits, out.query

    def warm_bare(self, batch_sizes: Sequence[int]) -> None:
        """Run the bare backbone once per batch size (lazy initialisation, kernel selection)."""
        for n in batch_sizes:
            images = _probe_images(n, self.input_size)
            x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).contiguous()
            with torch.inference_mode():
                features = self.model.backbone_features(self.normalize(x).to(self.dtype))
            if not bool(torch.isfinite(features).all()):
                raise InferenceError("the backbone produces non-finite features")

    def close(self) -> None:
        pass


def _check_version_number(version: Any) -> None:
    """Version numbers are SQLite integers >= 1; anything else cannot exist (404, never a 500)."""
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or not 1 <= version < 2**63:
        raise VersionNotFoundError(f"version {version!r} does not exist")


def _probe_images(n: int, size: tuple[int, int]) -> np.ndarray:
    """Deterministic probe images: a flat grey one, then seeded noise."""
    rng = np.random.default_rng(12345)
    images = rng.integers(0, 256, size=(n, size[0], size[1], 3), dtype=np.uint8)
    images[0] = 128
    return images


class Engine:
    """See the module docstring; the seam is fixed in /tmp/fmlora-interfaces.md (Engine seam)."""

    def __init__(self, registry: Any, config: EngineConfig | None = None, *, model: FMLoRAModel | None = None):
        self.registry = registry
        self.config = config or EngineConfig()
        self._model_arg = model
        self._lock = threading.RLock()
        self._started = False
        self._ready = False
        self._stopping = False
        self._live: VersionEntry | None = None
        self._backend: Any = None
        self._batcher: MicroBatcher | None = None
        self._cache: VersionCache | None = None
        self._watcher: RegistryWatcher | None = None
        self._prep_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._load_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._swap_lock = threading.Lock()
        self._inflight = 0  # predictions accepted and not yet answered
        self._inflight_cond = threading.Condition()
        self._batch_callbacks: list[Callable[[int, float], None]] = []
        self._swap_callbacks: list[Callable[[bool, float, int | None], None]] = []
        self.swaps_total = 0
        self.swaps_failed = 0
        self.last_swap_seconds: float | None = None
        self.last_swap_at: float | None = None
        self._temperature = float(registry.model_config.prompts.temperature)
        self.input_size: tuple[int, int] | None = None
        self.crop_pct = 1.0
        self._prep_threads = 1

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
            if self._watcher is not None:
                self._watcher.stop(1.0)
            if self._batcher is not None:
                self._batcher.stop(0.0)
            for pool in (self._prep_pool, self._load_pool):
                if pool is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
            if self._backend is not None:
                self._backend.close()
            self._stopping = True
            raise

    def _start(self) -> None:
        cfg = self.config
        started = time.perf_counter()
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        model = self._model_arg if self._model_arg is not None else FMLoRAModel(self.registry.model_config)
        if model.config != self.registry.model_config:
            raise ValueError("the model given to the engine was built for another ModelConfig than the registry's")
        if cfg.backend == "onnx":
            from server.core.onnx_engine import OnnxBackend

            self._backend = OnnxBackend(model, merge=cfg.merge_adapters, cache_dir=cfg.onnx_dir)
        else:
            self._backend = TorchBackend(model, device, dtype, cfg.merge_adapters)
        self.input_size = self._backend.input_size
        self.crop_pct = cfg.crop_pct if cfg.crop_pct is not None else model_crop_pct(model)
        self._cache = VersionCache(self.registry, self, capacity=cfg.cached_versions)
        self._prep_threads = cfg.preprocess_threads or min(8, os.cpu_count() or 1)
        self._prep_pool = concurrent.futures.ThreadPoolExecutor(self._prep_threads, "fmlora-preprocess")
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
        self._batcher.call(lambda: self._backend.warm_bare(sizes)).result()
        self._load_initial()
        self._watcher = RegistryWatcher(
            self.registry.live_version, lambda: self.serving_version, self._apply_live, cfg.poll_interval_s
        )
        if cfg.watch:
            self._watcher.start()
        self._ready = True
        log.info(
            "engine ready in %.2f s on %s (%s, %s), serving version %s",
            time.perf_counter() - started,
            self._backend.describe().get("device"),
            self._backend.describe().get("dtype"),
            self._backend.name,
            self.serving_version,
        )

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
        if self._watcher is not None:
            self._watcher.stop()
        with self._inflight_cond:  # requests still resizing or loading a pinned version
            while self._inflight > 0 and time.monotonic() < deadline:
                self._inflight_cond.wait(deadline - time.monotonic())
            drained = self._inflight == 0
        if self._batcher is not None:
            drained = self._batcher.stop(max(0.0, deadline - time.monotonic())) and drained
        for pool in (self._prep_pool, self._load_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if self._backend is not None:
            self._backend.close()
        log.info("engine stopped (%s)", "drained" if drained else "queue not drained before the timeout")
        return drained

    async def astop(self, timeout_s: float = 30.0) -> bool:
        return await asyncio.get_running_loop().run_in_executor(None, self.stop, timeout_s)

    # -- state ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def serving_version(self) -> int | None:
        live = self._live
        return None if live is None else live.version

    @property
    def serving_sha256(self) -> str | None:
        live = self._live
        return None if live is None else live.sha256

    @property
    def serving(self) -> VersionEntry | None:
        return self._live

    @property
    def labels(self) -> list[str]:
        live = self._live
        return [] if live is None else list(live.labels)

    @property
    def tasks(self) -> list[TaskRecord]:
        live = self._live
        return [] if live is None else list(live.tasks)

    @property
    def device(self) -> str | None:
        return None if self._backend is None else self._backend.describe()["device"]

    def describe(self) -> dict[str, Any]:
        """Static facts for /info: backend, device, dtype, input size, batching limits."""
        info: dict[str, Any] = {} if self._backend is None else dict(self._backend.describe())
        cfg = self.config
        info.update(
            {
                "backbone": self.registry.model_config.backbone.name,
                "input_size": None if self.input_size is None else list(self.input_size),
                "crop_pct": self.crop_pct,
                "merged_adapters": cfg.merge_adapters,
                "max_batch_size": cfg.max_batch_size,
                "max_wait_ms": cfg.max_wait_ms,
                "max_queue": cfg.max_queue,
                "request_timeout_s": cfg.request_timeout_s,
                "cached_versions": cfg.cached_versions,
            }
        )
        return info

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ready": self._ready,
            "serving_version": self.serving_version,
            "swaps_total": self.swaps_total,
            "swaps_failed": self.swaps_failed,
            "last_swap_seconds": self.last_swap_seconds,
        }
        if self._batcher is not None:
            b = asdict(self._batcher.stats())
            out["queue_depth"] = b.pop("queue_items")
            out.update(b)
        else:
            out["queue_depth"] = 0
        if self._cache is not None:
            out["versions"] = self._cache.stats()
        if self._backend is not None:
            out["adapter_switches_total"] = self._backend.switches_total
            out["last_adapter_switch_seconds"] = self._backend.last_switch_seconds
        if self._watcher is not None:
            out["registry_polls_total"] = self._watcher.polls_total
            out["registry_poll_errors_total"] = self._watcher.poll_errors_total
            out["registry_live_version"] = self._watcher.last_seen
        return out

    # -- metrics hooks -------------------------------------------------------------------------
    def on_batch(self, callback: Callable[[int, float], None]) -> None:
        """``callback(size, seconds)`` after every batch (called from the inference thread)."""
        self._batch_callbacks.append(callback)

    def on_swap(self, callback: Callable[[bool, float, int | None], None]) -> None:
        """``callback(ok, seconds, version)`` after every swap attempt that loaded something."""
        self._swap_callbacks.append(callback)

    def _emit_batch(self, size: int, seconds: float) -> None:
        for cb in list(self._batch_callbacks):
            try:
                cb(size, seconds)
            except Exception:
                log.exception("on_batch callback failed")

    def _emit_swap(self, ok: bool, seconds: float, version: int | None) -> None:
        for cb in list(self._swap_callbacks):
            try:
                cb(ok, seconds, version)
            except Exception:
                log.exception("on_swap callback failed")

    # -- swapping ------------------------------------------------------------------------------
    def _apply_live(self, version: int) -> None:
        """Watcher callback: the registry's live pointer now says ``version``."""
        self._swap_to(version)

    def _swap_to(self, version: int) -> bool:
        """Load-verify-warm ``version`` (or take it from the cache) and make it the serving one."""
        assert self._cache is not None
        with self._swap_lock:
            if self.serving_version == version:
                return True
            started = time.perf_counter()
            try:
                sha = self.registry.get_version(version).sha256
                entry = self._cache.load(version, sha)
            except KnownBadVersionError:
                return False  # refused and counted when it first failed
            except (VersionUnavailableError, FmloraError) as exc:
                seconds = time.perf_counter() - started
                self.swaps_failed += 1
                log.warning("swap to version %d refused, still serving %s: %s", version, self.serving_version, exc)
                self._emit_swap(False, seconds, version)
                return False
            except Exception:
                seconds = time.perf_counter() - started
                self.swaps_failed += 1
                log.exception("swap to version %d failed, still serving %s", version, self.serving_version)
                self._emit_swap(False, seconds, version)
                return False
            self._live = entry  # the swap: the next request reads this reference
            self._cache.protect(version)
            seconds = time.perf_counter() - started
            self.swaps_total += 1
            self.last_swap_seconds = seconds
            self.last_swap_at = time.time()
            log.info("now serving version %d (swap took %.3f s)", version, seconds)
        self._emit_swap(True, seconds, version)
        return True

    def reload(self) -> int | None:
        """Admin reload: forget the live version's past failure, poll the registry now, swap if it
        changed. Blocks while a new version loads (call it from a worker thread, or ``areload``)."""
        if not self._ready or self._watcher is None or self._cache is None:
            raise NotReadyError("the engine is not started")
        try:
            live = self.registry.live_version()
        except Exception as exc:
            log.warning("reload: cannot read the registry: %s", exc)
            return self.serving_version
        if live is not None:
            self._cache.forget_failure(live)
        self._watcher.check()
        return self.serving_version

    async def areload(self) -> int | None:
        return await asyncio.get_running_loop().run_in_executor(self._load_pool, self.reload)

    # -- VersionBackend (for the cache) ----------------------------------------------------------
    def check(self, snapshot: Snapshot) -> None:
        self._backend.check(snapshot)

    def stage(self, snapshot: Snapshot) -> dict[str, torch.Tensor]:
        return self._backend.stage(snapshot)

    def warm(self, entry: VersionEntry) -> None:
        self._backend.prepare_entry(entry)
        assert self._batcher is not None
        if self._batcher.in_inference_thread():
            self._warm_in_thread(entry)
        else:
            self._batcher.call(lambda: self._warm_in_thread(entry)).result()

    def _warm_in_thread(self, entry: VersionEntry) -> None:
        size = self._backend.input_size
        choices = [PromptChoice("auto"), PromptChoice("none")]
        if entry.tasks:
            choices.append(PromptChoice("task", entry.tasks[0].name))
        try:
            self._backend.activate(entry)
            logits, _ = self._backend.forward(_probe_images(len(choices), size), choices)
            shape_ok = tuple(logits.shape) == (len(choices), len(entry.labels))
            finite = bool(torch.isfinite(logits).all())
        except Exception as exc:
            self._backend.invalidate()
            raise SnapshotWarmupError(f"version {entry.version} failed its warm-up: {exc}") from exc
        if not shape_ok or not finite:
            self._backend.invalidate()
            raise SnapshotWarmupError(
                f"version {entry.version} failed its warm-up: "
                + ("non-finite outputs" if not finite else f"outputs of shape {tuple(logits.shape)}")
            )

    # -- predicting ----------------------------------------------------------------------------
    def _check_ready(self) -> None:
        if not self._ready or self._batcher is None:
            raise NotReadyError("the model is not loaded yet" if not self._stopping else "the server is shutting down")

    @staticmethod
    def _parse_request(images: Sequence[Any], top_k: int, prompt: Any) -> tuple[PromptChoice, int]:
        if images is None or len(images) == 0:
            raise InvalidRequestError("a prediction needs at least one image")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise InvalidRequestError(f"top_k must be a positive integer, got {top_k!r}")
        return PromptChoice.parse(prompt), int(top_k)

    @staticmethod
    def _check_prompt(entry: VersionEntry, choice: PromptChoice) -> None:
        if choice.mode == "task" and choice.task not in entry.task_names:
            known = ", ".join(entry.task_names) or "none yet"
            raise UnknownTaskError(
                f"unknown task {choice.task!r} for prompt selection in version {entry.version} (known: {known})"
            )

    def _prepare(self, images: Sequence[Any], first: int = 0) -> list[np.ndarray]:
        """Validate and resize images exactly as training does (PIL releases the GIL meanwhile)."""
        size = self._backend.input_size
        out = []
        for i, image in enumerate(images):
            try:
                out.append(resize_for_model(as_rgb_array(image), size, self.crop_pct))
            except InvalidImageInput as exc:
                raise InvalidImageInput(f"image {first + i}: {exc.message}") from None
        return out

    def _chunks(self, images: Sequence[Any]) -> list[tuple[int, Sequence[Any]]]:
        """Split a request's images into up to ``preprocess_threads`` runs for the resize pool."""
        n = len(images)
        parts = max(1, min(self._prep_threads, n))
        bounds = [round(i * n / parts) for i in range(parts + 1)]
        return [(bounds[i], images[bounds[i] : bounds[i + 1]]) for i in range(parts)]

    async def _prepare_async(self, images: Sequence[Any], deadline: float) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        futures = [
            loop.run_in_executor(self._prep_pool, self._prepare, chunk, first) for first, chunk in self._chunks(images)
        ]
        parts = await self._await(asyncio.gather(*futures), deadline)
        return [image for part in parts for image in part]

    def _prepare_sync(self, images: Sequence[Any]) -> list[np.ndarray]:
        if not self._needs_resize(images) or len(images) == 1 or self._prep_pool is None:
            return self._prepare(images)
        futures = [self._prep_pool.submit(self._prepare, chunk, first) for first, chunk in self._chunks(images)]
        return [image for future in futures for image in future.result()]

    def _needs_resize(self, images: Sequence[Any]) -> bool:
        h, w = self._backend.input_size
        return self.crop_pct != 1.0 or any(not isinstance(im, np.ndarray) or im.shape[:2] != (h, w) for im in images)

    def _pinned(self, version: int) -> VersionEntry:
        assert self._cache is not None
        _check_version_number(version)
        entry = self._cache.get(version)
        if entry is not None:
            return entry
        info = self.registry.get_version(version)  # VersionNotFoundError -> 404
        return self._cache.load(version, info.sha256)

    async def predict(
        self,
        images: Sequence[np.ndarray],
        top_k: int = 5,
        prompt: Any = "auto",
        version: int | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Prediction:
        """Classify ``images`` (uint8 (H, W, 3) arrays of any size) on the live or a pinned version."""
        self._enter()
        try:
            return await self._predict(images, top_k, prompt, version, timeout_s)
        finally:
            self._leave()

    def _enter(self) -> None:
        with self._inflight_cond:
            self._check_ready()
            self._inflight += 1

    def _leave(self) -> None:
        with self._inflight_cond:
            self._inflight -= 1
            if self._inflight == 0:
                self._inflight_cond.notify_all()

    async def _predict(
        self, images: Sequence[np.ndarray], top_k: int, prompt: Any, version: int | None, timeout_s: float | None
    ) -> Prediction:
        assert self._batcher is not None
        timeout = self.config.request_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        choice, k = self._parse_request(images, top_k, prompt)
        loop = asyncio.get_running_loop()
        if version is None:
            entry = self._live
            if entry is None:
                raise NoModelError("no model version is live yet: submit a task and wait for it to be learned")
        else:
            _check_version_number(version)
            entry = self._cache.get(version) if self._cache is not None else None
            if entry is None:
                entry = await self._await(loop.run_in_executor(self._load_pool, self._pinned, version), deadline)
        self._check_prompt(entry, choice)
        if self._needs_resize(images):
            prepared = await self._prepare_async(images, deadline)
        else:
            prepared = self._prepare(images)
        items = [_Item(image, choice, k) for image in prepared]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RequestTimeoutError(f"the request did not complete within {timeout:g} s")
        results = await self._batcher.run(entry, items, remaining)
        return Prediction(entry.version, entry.sha256, results)

    @staticmethod
    async def _await(future: asyncio.Future, deadline: float) -> Any:
        remaining = deadline - time.monotonic()
        try:
            return await asyncio.wait_for(future, max(remaining, 0.001))
        except asyncio.TimeoutError:
            raise RequestTimeoutError("the request did not complete within its timeout") from None

    def predict_sync(
        self,
        images: Sequence[np.ndarray],
        top_k: int = 5,
        prompt: Any = "auto",
        version: int | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Prediction:
        """``predict`` for callers without an event loop (benchmarks, tests, scripts)."""
        self._enter()
        try:
            return self._predict_sync(images, top_k, prompt, version, timeout_s)
        finally:
            self._leave()

    def _predict_sync(
        self, images: Sequence[np.ndarray], top_k: int, prompt: Any, version: int | None, timeout_s: float | None
    ) -> Prediction:
        assert self._batcher is not None
        choice, k = self._parse_request(images, top_k, prompt)
        if version is None:
            entry = self._live
            if entry is None:
                raise NoModelError("no model version is live yet: submit a task and wait for it to be learned")
        else:
            entry = self._pinned(version)
        self._check_prompt(entry, choice)
        items = [_Item(image, choice, k) for image in self._prepare_sync(images)]
        results = self._batcher.run_sync(entry, items, timeout_s)
        return Prediction(entry.version, entry.sha256, results)

    # -- the inference thread ------------------------------------------------------------------
    def _run_batch(self, entry: VersionEntry, items: list[_Item]) -> list[ImageResult]:
        backend = self._backend
        backend.activate(entry)
        choices = [it.choice for it in items]
        logits, query = backend.forward(np.stack([it.image for it in items]), choices)
        if logits.ndim != 2 or logits.shape[0] != len(items) or logits.shape[1] != len(entry.labels):
            raise InferenceError("the model returned logits that do not match the batch")
        with torch.inference_mode():
            probs = logits.float().softmax(dim=-1)
            k = min(max(it.top_k for it in items), probs.shape[1])
            scores, indices = probs.topk(k, dim=-1)
            affinity = self._task_affinity(entry, query, choices)
            # One device-to-host copy (one sync) for everything the answers need.
            columns = [scores, indices.float()]
            if affinity is not None:
                top = max(1, min(self.config.prompt_weights_top, affinity.shape[1]))
                aff_w, aff_i = affinity.topk(top, dim=-1)  # column 0 of aff_i is the nearest task
                columns += [aff_w, aff_i.float()]
            host = torch.cat(columns, dim=1).cpu().numpy()
            scores_l = host[:, :k].tolist()
            indices_l = host[:, k : 2 * k].astype(np.int64).tolist()
            if affinity is not None:
                aff_w_l = host[:, 2 * k : 2 * k + top].tolist()
                aff_i_l = host[:, 2 * k + top :].astype(np.int64).tolist()
                nearest_l = [row[0] for row in aff_i_l]
        labels, label_tasks, names = entry.labels, entry.label_tasks, entry.task_names
        results = []
        for row, item in enumerate(items):
            predictions = [
                {"label": labels[j], "score": float(s), "task": label_tasks[j]}
                for j, s in zip(indices_l[row][: item.top_k], scores_l[row][: item.top_k], strict=True)
            ]
            mode = item.choice.mode
            task: str | None = item.choice.task if mode == "task" else None
            weights: dict[str, float] = {}
            if affinity is not None and mode != "none":
                if mode == "auto":
                    task = names[nearest_l[row]]
                if self.config.prompt_weights_top > 0:
                    weights = {names[j]: float(w) for j, w in zip(aff_i_l[row], aff_w_l[row], strict=True)}
            results.append(ImageResult(predictions, {"mode": mode, "task": task, "weights": weights}))
        return results

    def _task_affinity(
        self, entry: VersionEntry, query: torch.Tensor | None, choices: list[PromptChoice]
    ) -> torch.Tensor | None:
        """(N, tasks): softmax over learned tasks of cos(prompt query, task key) / T. The query is
        the image's [CLS] entering the prompted blocks (auto) or the named task's key (task)."""
        keys = entry.tensors.get("prompts.task_keys")
        if query is None or keys is None or keys.shape[0] == 0:
            return None
        keys = keys.to(device=query.device, dtype=torch.float32)
        q = query.float()
        named = [(row, entry.task_names.index(c.task)) for row, c in enumerate(choices) if c.mode == "task"]
        if named:
            q = q.clone()
            for row, index in named:
                q[row] = keys[index]
        cos = F.cosine_similarity(q.unsqueeze(1), keys.unsqueeze(0), dim=-1)
        return torch.softmax(cos / self._temperature, dim=-1)
