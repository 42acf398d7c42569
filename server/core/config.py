"""The engine's configuration (a frozen dataclass) and the device and dtype it resolves to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["DTYPES", "EngineConfig", "resolve_device", "resolve_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:N"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    max_batch_size: int = 32  # images per batch
    max_wait_ms: float = 5.0
    max_queue: int = 256  # images waiting
    request_timeout_s: float = 30.0
    # Versions kept loaded, verified and prepared (with merged weights when merge_adapters) for pinning
    # and instant rollback; each costs its adapter tensors plus, merged, one copy of every adapted matrix.
    cached_versions: int = 4
    poll_interval_s: float = 0.5
    # Wake on the registry's change feed (PostgreSQL LISTEN/NOTIFY) where it has one; polling stays the
    # fallback. False (or SQLite): poll only.
    notify: bool = True
    backend: Literal["torch", "onnx"] = "torch"
    merge_adapters: bool = True
    # Centre-crop fraction when resizing to the model's input size. None: the model's timm data config
    # value (capped at 1), which is what the worker trains with (fmlora.worker.worker._image_set).
    crop_pct: float | None = None
    watch: bool = True  # a thread follows the registry's live pointer (else only reload() looks)
    # False: serve the version live at start and ignore the registry afterwards (neither the watcher
    # nor reload() swap); a frozen replica, e.g. the swap benchmark's control run.
    follow_registry: bool = True
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
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError("crop_pct must be in (0, 1]")
        if (self.preprocess_threads is not None and self.preprocess_threads < 1) or self.prompt_weights_top < 0:
            raise ValueError("preprocess_threads must be >= 1 and prompt_weights_top >= 0")


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
    return DTYPES[name]
