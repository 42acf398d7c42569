"""Publish snapshots into a registry fast, without training: for the swap, soak and fuzz benchmarks
and the reliability tests.

``Publisher(registry)`` builds the registry's model once and publishes versions the way the worker
does (``save_snapshot`` into ``registry.snapshot_dir(registry.next_version())``, then
``registry.record_version(accepted=True)``, which makes it live), with random factors standing in for
learning (as ``tests/helpers.learn_quickly`` does):

- ``publish(new_task=True)`` runs a task's life cycle (begin, random factors, end): the head and the
  task list grow by one task;
- ``publish(new_task=False)`` re-publishes the same tasks with perturbed cores, prompts and head (a
  retrained or refreshed adapter): every version has the same size, so a memory soak measures the
  server, not a growing model.

``publish_bad(kind)`` records a snapshot the server must refuse while it keeps serving the previous
version (``BAD_KINDS``): flipped tensor bytes (hash mismatch), a truncated tensor file (hash updated,
so only the parser catches it), a manifest for another backbone, a tensor of the wrong shape, a
non-finite tensor, and a missing tensor file. Each is recorded as accepted so the registry's live
pointer moves to it and the server actually tries it.

The server builds its own copy of the model from the registry's ``model.json``, so the backbone must
load the same weights in both processes: use a file-backed configuration (``benchmarks._common.
model_config`` saves random weights to a file first), never ``weights="random"``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fmlora.model import FMLoRAModel
from fmlora.model.snapshot import CONFIG_FILE, TENSOR_FILE, save_snapshot, sha256_file
from fmlora.registry.registry import Registry

__all__ = ["BAD_KINDS", "Published", "Publisher"]

BAD_KINDS: tuple[str, ...] = ("corrupt", "truncated", "incompatible", "wrong_shape", "nonfinite", "missing_file")


@dataclass(frozen=True)
class Published:
    version: int
    kind: str  # "task", "refresh", "rollback" or one of BAD_KINDS
    good: bool
    committed_at: float  # time.monotonic() right after the registry commit (the live pointer moved)
    seconds: float  # writing the snapshot and recording it
    tasks: tuple[str, ...] = ()


@dataclass
class Publisher:
    """Publishes versions of one model into ``registry`` (one thread at a time: a lock serialises)."""

    registry: Registry
    seed: int = 0
    classes_per_task: int = 2
    noise: float = 0.05
    history: list[Published] = field(default_factory=list)

    def __post_init__(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model = FMLoRAModel(self.registry.model_config).eval()
        self._gen = torch.Generator().manual_seed(self.seed)
        self._lock = threading.Lock()
        self._tasks_made = 0

    # -- what has been published -------------------------------------------------------------------
    @property
    def good_versions(self) -> list[int]:
        return [p.version for p in self.history if p.good and p.kind != "rollback"]

    @property
    def bad_versions(self) -> list[int]:
        return [p.version for p in self.history if not p.good]

    # -- good versions -----------------------------------------------------------------------------
    def _learn_task(self, name: str | None, classes: Sequence[str] | None, kind: str) -> str:
        self._tasks_made += 1
        name = name or f"task{self._tasks_made:04d}"
        if classes is None:
            classes = [f"{name}-c{i}" for i in range(self.classes_per_task)]
        g = self._gen
        m = self.model
        m.begin_task(name, kind, list(classes), complexity=0.5, novelty=0.5, generator=g)
        with torch.no_grad():
            for p in m.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=g) * self.noise)
        m.end_task(torch.randn(m.embed_dim, generator=g), torch.randn(m.embed_dim, generator=g))
        return name

    def _refresh(self) -> None:
        """Perturb the folded cores, the prompt bank and the head: same tasks, same sizes, new bytes."""
        m = self.model
        tensors = m.adapter_tensors()
        changed = {}
        for name, t in tensors.items():
            if name.endswith(".core") or name.startswith(("head.", "prompts.bank")):
                t = t + torch.randn(t.shape, generator=self._gen, dtype=t.dtype) * (self.noise / 5)
            changed[name] = t
        m.load_adapter_state(changed, list(m.tasks), list(m.head.labels), list(m.head.label_tasks))

    def _card(self) -> dict[str, Any]:
        names = [t.name for t in self.model.tasks]
        return {
            "task": names[-1] if names else None,
            "tasks": names,
            "accuracy": {n: round(0.6 + 0.3 * ((i * 7919) % 100) / 100, 4) for i, n in enumerate(names)},
            "final_accuracy": 0.75,
            "average_incremental_accuracy": 0.8,
            "forgetting": 0.02,
            "benchmark_publisher": True,
        }

    def _write(self) -> tuple[int, Path, Any]:
        version = self.registry.next_version()
        directory = self.registry.snapshot_dir(version)
        manifest = save_snapshot(
            self.model,
            directory,
            version=version,
            parent_version=self.registry.live_version(),
            card=self._card(),
        )
        return version, directory, manifest

    def _record(
        self, version: int, sha256: str, adapter_bytes: int, kind: str, good: bool, started: float
    ) -> Published:
        names = [t.name for t in self.model.tasks]
        self.registry.record_version(
            version=version,
            parent=self.registry.live_version(),
            sha256=sha256,
            tasks=names,
            card=self._card(),
            adapter_bytes=adapter_bytes,
            task_id=None,
            accepted=True,
        )
        now = time.monotonic()
        published = Published(version, kind, good, now, now - started, tuple(names))
        self.history.append(published)
        return published

    def publish(
        self,
        new_task: bool | None = None,
        *,
        name: str | None = None,
        classes: Sequence[str] | None = None,
        kind: str = "class",
    ) -> Published:
        """Publish a good version and make it live. ``new_task``: learn a task (default when none is
        learned yet) or re-publish the same tasks with perturbed tensors."""
        with self._lock:
            started = time.monotonic()
            if new_task is None:
                new_task = not self.model.tasks
            if new_task or not self.model.tasks:
                self._learn_task(name, classes, kind)
                what = "task"
            else:
                self._refresh()
                what = "refresh"
            version, _, manifest = self._write()
            return self._record(version, manifest.tensors_sha256, manifest.adapter_bytes, what, True, started)

    def rollback(self, version: int) -> Published:
        """Make an earlier good version live again through the registry (as an admin would)."""
        with self._lock:
            started = time.monotonic()
            self.registry.activate(version)
            now = time.monotonic()
            info = self.registry.get_version(version)
            published = Published(version, "rollback", True, now, now - started, tuple(info.tasks))
            self.history.append(published)
            return published

    def note_rollback(self, version: int, committed_at: float) -> Published:
        """Record a rollback done elsewhere (e.g. POST /models/{v}/activate) in the history."""
        with self._lock:
            info = self.registry.get_version(version)
            published = Published(version, "rollback", True, committed_at, 0.0, tuple(info.tasks))
            self.history.append(published)
            return published

    # -- bad versions ------------------------------------------------------------------------------
    def publish_bad(self, kind: str) -> Published:
        """Write a snapshot the server must refuse (see BAD_KINDS), record it as live, and return it.
        The model itself is left as it was."""
        if kind not in BAD_KINDS:
            raise ValueError(f"unknown bad snapshot kind {kind!r}; one of {BAD_KINDS}")
        with self._lock:
            if not self.model.tasks:
                raise RuntimeError("publish a good version first")
            started = time.monotonic()
            version, directory, manifest = self._write()
            sha = manifest.tensors_sha256
            tensor_path, config_path = directory / TENSOR_FILE, directory / CONFIG_FILE
            if kind == "corrupt":
                data = bytearray(tensor_path.read_bytes())
                middle = len(data) // 2
                for i in range(middle, min(len(data), middle + 64)):
                    data[i] ^= 0xFF
                tensor_path.write_bytes(bytes(data))
            elif kind == "truncated":
                data = tensor_path.read_bytes()
                tensor_path.write_bytes(data[: len(data) // 2])
                sha = _rewrite_manifest(config_path, tensor_path)
            elif kind == "incompatible":
                raw = json.loads(config_path.read_text(encoding="utf-8"))
                raw["backbone"]["weights_sha256"] = "0" * 64
                raw["backbone"]["name"] = raw["backbone"]["name"] + "-other"
                config_path.write_text(json.dumps(raw, indent=2), encoding="utf-8")
            elif kind in ("wrong_shape", "nonfinite"):
                tensors = load_file(str(tensor_path))
                if kind == "wrong_shape":
                    w = tensors["head.weight"]
                    tensors["head.weight"] = torch.cat([w, w[:1]])
                else:
                    b = tensors["head.bias"].clone()
                    b[0] = float("nan")
                    tensors["head.bias"] = b
                tensor_path.unlink()
                save_file(tensors, str(tensor_path), metadata={"format": "fmlora", "format_version": "1"})
                sha = _rewrite_manifest(config_path, tensor_path)
            elif kind == "missing_file":
                tensor_path.unlink()
            return self._record(version, sha, manifest.adapter_bytes, kind, False, started)


def _rewrite_manifest(config_path: Path, tensor_path: Path) -> str:
    """Make the manifest (and so the registry row) agree with the tensor file's new bytes."""
    sha = sha256_file(tensor_path)
    raw = json.loads(config_path.read_text(encoding="utf-8"))
    raw["tensors_sha256"] = sha
    raw["tensor_bytes"] = tensor_path.stat().st_size
    config_path.write_text(json.dumps(raw, indent=2), encoding="utf-8")
    return sha
