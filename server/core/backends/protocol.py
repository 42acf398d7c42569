"""The one interface every inference backend implements (torch, ONNX Runtime).

Threads: ``check``, ``stage`` and ``prepare`` run in whichever thread loads a version (the watcher,
a loader for a pinned request); ``activate``, ``forward`` and ``warm_bare`` run only in the engine's
inference thread. ``prepare`` does all per-version work (merged weights, feeds, a probe batch), so
``activate`` is a reference flip between two batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypedDict

import numpy as np
import torch
from typing_extensions import NotRequired

from fmlora.model.prompts import PromptChoice
from fmlora.model.snapshot import Snapshot
from server.core.stages import timed
from server.core.versions import PreparedVersion, SnapshotWarmupError, VersionEntry

__all__ = ["Backend", "BackendInfo", "probe_images", "run_probe"]


class BackendInfo(TypedDict):
    backend: str
    device: str
    dtype: str
    onnxruntime: NotRequired[str]
    onnx_graph: NotRequired[str]


class Backend(Protocol):
    name: str
    input_size: tuple[int, int]
    switches_total: int  # activations that changed the version in use
    last_switch_seconds: float | None

    def describe(self) -> BackendInfo: ...

    # -- any thread ------------------------------------------------------------------------------
    def check(self, snapshot: Snapshot) -> None:
        """Raise unless the snapshot fits the resident model (``check_compatible``)."""

    def stage(self, snapshot: Snapshot) -> dict[str, torch.Tensor]:
        """The snapshot's tensors on the serving device and dtype."""

    def prepare(self, entry: VersionEntry) -> PreparedVersion:
        """Everything ``activate`` needs, checked on a probe batch (``SnapshotWarmupError`` if bad)."""

    def close(self) -> None: ...

    # -- the inference thread ----------------------------------------------------------------------
    def activate(self, entry: VersionEntry) -> None:
        """Serve ``entry`` from the next forward on (a prepared entry: no copies, no arithmetic)."""

    def forward(self, images: np.ndarray, choices: list[PromptChoice]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, H, W, 3) uint8 at the input size → (logits (N, C), prompt query (N, D) or None)."""

    def warm_bare(self, batch_sizes: Sequence[int]) -> None:
        """Run the bare model once per batch size (lazy initialisation, kernel selection)."""


def probe_images(n: int, size: tuple[int, int]) -> np.ndarray:
    """Deterministic probe images: a flat grey one, then seeded noise."""
    rng = np.random.default_rng(12345)
    images = rng.integers(0, 256, size=(n, size[0], size[1], 3), dtype=np.uint8)
    images[0] = 128
    return images


def run_probe(
    entry: VersionEntry,
    size: tuple[int, int],
    forward: Callable[[np.ndarray, list[PromptChoice]], torch.Tensor | np.ndarray],
) -> None:
    """Check a prepared version on one probe image per prompt path (auto, none, its first task):
    finite logits over exactly its labels, else ``SnapshotWarmupError``. Out of memory is transient
    (re-raised as is: the version cache retries it after a backoff)."""
    choices = [PromptChoice("auto"), PromptChoice("none")]
    if entry.tasks:
        choices.append(PromptChoice("task", entry.tasks[0].name))
    try:
        with timed("probe"):
            logits = forward(probe_images(len(choices), size), choices)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        raise SnapshotWarmupError(f"version {entry.version} failed its warm-up: {exc}") from exc
    shape = tuple(logits.shape)
    finite = bool(np.isfinite(logits).all()) if isinstance(logits, np.ndarray) else bool(torch.isfinite(logits).all())
    if shape != (len(choices), len(entry.labels)) or not finite:
        problem = "non-finite outputs" if not finite else f"outputs of shape {shape}"
        raise SnapshotWarmupError(f"version {entry.version} failed its warm-up: {problem}")
