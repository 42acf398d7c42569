"""Versions published into a registry fast, without training: for the benchmarks and the reliability
tests. Every version, good or bad, is published by ``fmlora.registry.publish_version`` (write beside,
rename, read back, record), the worker's own path; random factors stand in for learning.

``make_home(home, backbone, tasks=2)`` opens a registry on ``models.model_config(backbone)`` and
publishes ``tasks`` tasks, each live in turn; it returns the ``Publisher``. ``Publisher(registry)``
builds the registry's model once, then:

- ``publish(new_task=True)`` runs a task's life cycle (begin, random factors, end): the head and the
  task list grow by one task;
- ``publish(new_task=False)`` re-publishes the same tasks with perturbed cores, prompts and head (a
  retrained or refreshed adapter): every version has the same size, so a memory soak measures the
  server, not a growing model;
- ``publish_bad(kind)`` publishes a snapshot the server must refuse while it keeps serving the
  previous version (``BAD_KINDS``): flipped tensor bytes (hash mismatch), a truncated tensor file
  (hash updated, so only the parser catches it), a manifest for another backbone, a tensor of the
  wrong shape, a non-finite tensor, a missing tensor file. Each is recorded as accepted, so the live
  pointer moves to it and the server actually tries it.

A bad snapshot is damaged after ``publish_version`` has read it back and before it is recorded: the
read-back refuses exactly the damage a bad kind is made of (at the ``"written"`` hook, four kinds of
six would be refused and removed there), and damage after recording would race the server, which
could load the good files first. ``_DamageOnRecord`` is the registry with a ``record_version`` that
damages the files first.

The server builds its own copy of the model from the registry's ``model.json``, so the backbone must
load the same weights in both processes: use ``models.model_config`` (file-backed weights), never
``weights="random"``.
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

from benchmarks.models import model_config
from fmlora.model import FMLoRAModel
from fmlora.model.snapshot import CONFIG_FILE, TENSOR_FILE, sha256_file
from fmlora.registry.publish import publish_version
from fmlora.registry.registry import Registry, VersionInfo

__all__ = ["BAD_KINDS", "Published", "Publisher", "learn_quickly", "make_home"]

BAD_KINDS: tuple[str, ...] = ("corrupt", "truncated", "incompatible", "wrong_shape", "nonfinite", "missing_file")


@dataclass(frozen=True)
class Published:
    version: int
    kind: str  # "task", "refresh", "rollback" or one of BAD_KINDS
    good: bool
    committed_at: float  # time.monotonic() right after the registry commit (the live pointer moved)
    seconds: float  # writing, verifying and recording the snapshot
    tasks: tuple[str, ...] = ()


def learn_quickly(
    model: FMLoRAModel, name: str, classes: Sequence[str], generator: torch.Generator, noise: float = 0.05
) -> None:
    """A task's life cycle without training: random factors, bank and head rows stand in for learning
    (the same tensors, shapes and code paths as a trained task; accuracy is meaningless)."""
    g = generator
    model.begin_task(name, "class", list(classes), complexity=0.5, novelty=0.5, generator=g)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    model.end_task(torch.randn(model.embed_dim, generator=g), torch.randn(model.embed_dim, generator=g))


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
    def _learn_task(self, name: str | None, classes: Sequence[str] | None) -> None:
        self._tasks_made += 1
        name = name or f"task{self._tasks_made:04d}"
        if classes is None:
            classes = [f"{name}-c{i}" for i in range(self.classes_per_task)]
        learn_quickly(self.model, name, classes, self._gen, self.noise)

    def _refresh(self) -> None:
        """Perturb the folded cores, the prompt bank and the head: same tasks, same sizes, new bytes."""
        m = self.model
        changed = {}
        for name, t in m.adapter_tensors().items():
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

    def _publish(self, kind: str, good: bool, started: float, registry: Registry | None = None) -> Published:
        info = publish_version(
            registry or self.registry, self.model, card=self._card(), parent=self.registry.live_version()
        )
        now = time.monotonic()
        published = Published(info.version, kind, good, now, now - started, tuple(info.tasks))
        self.history.append(published)
        return published

    def publish(
        self, new_task: bool | None = None, *, name: str | None = None, classes: Sequence[str] | None = None
    ) -> Published:
        """Publish a good version and make it live. ``new_task``: learn a task (default when none is
        learned yet) or re-publish the same tasks with perturbed tensors."""
        with self._lock:
            started = time.monotonic()
            if new_task is None:
                new_task = not self.model.tasks
            if new_task or not self.model.tasks:
                self._learn_task(name, classes)
                return self._publish("task", True, started)
            self._refresh()
            return self._publish("refresh", True, started)

    def rollback(self, version: int) -> Published:
        """Make an earlier good version live again through the registry (as an admin would)."""
        with self._lock:
            started = time.monotonic()
            info = self.registry.activate(version)
            now = time.monotonic()
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
        """Publish a snapshot the server must refuse (see BAD_KINDS) as the live version, and return
        it. The model itself is left as it was."""
        if kind not in BAD_KINDS:
            raise ValueError(f"unknown bad snapshot kind {kind!r}; one of {BAD_KINDS}")
        with self._lock:
            if not self.model.tasks:
                raise RuntimeError("publish a good version first")
            return self._publish(kind, False, time.monotonic(), _DamageOnRecord(self.registry, kind))


def make_home(
    home: str | Path,
    backbone: str = "offline",
    *,
    tasks: int = 2,
    classes_per_task: int = 5,
    weights_dir: str | Path | None = None,
    weights: str = "random",
    seed: int = 0,
) -> Publisher:
    """Create ``home`` on ``backbone`` (see ``models.backbone_config``; weights in ``weights_dir``,
    default beside ``home``) with ``tasks`` tasks, each published as the live version in turn."""
    weights_dir = weights_dir if weights_dir is not None else Path(home).parent / "weights"
    registry = Registry.open(home, model_config(backbone, weights_dir, weights=weights))
    publisher = Publisher(registry, seed=seed, classes_per_task=classes_per_task)
    for _ in range(tasks):
        publisher.publish(new_task=True)
    return publisher


# -- damage ----------------------------------------------------------------------------------------
class _DamageOnRecord(Registry):
    """``registry``, except that ``record_version`` first damages the written and verified snapshot."""

    def __init__(self, registry: Registry, kind: str) -> None:
        super().__init__(registry.home, registry.model_config, registry.db, registry.store)
        self.kind = kind

    def record_version(self, *, version: int, sha256: str, **fields: Any) -> VersionInfo:  # type: ignore[override]
        directory = self.snapshot_dir(version)  # a file store: the stored objects themselves
        rewritten = _damage(self.kind, directory)
        # The objects' hashes follow the damage too, so that only the parser or the model's checks refuse it.
        objects = fields.pop("objects", None) or {}
        objects = {
            name: sha256_file(directory / name) if (directory / name).is_file() else sha
            for name, sha in objects.items()
        }
        return super().record_version(version=version, sha256=rewritten or sha256, objects=objects, **fields)


def _damage(kind: str, directory: Path) -> str | None:
    """Damage the snapshot in ``directory`` as ``kind`` says. Returns the tensor file's new sha256
    where the manifest is made to agree with the new bytes (so only the parser or the model's own
    checks can refuse it); None where the recorded hash stays."""
    tensor_path, config_path = directory / TENSOR_FILE, directory / CONFIG_FILE
    if kind == "corrupt":
        data = bytearray(tensor_path.read_bytes())
        middle = len(data) // 2
        for i in range(middle, min(len(data), middle + 64)):
            data[i] ^= 0xFF
        tensor_path.write_bytes(bytes(data))
        return None
    if kind == "truncated":
        data = tensor_path.read_bytes()
        tensor_path.write_bytes(data[: len(data) // 2])
        return _rewrite_manifest(config_path, tensor_path)
    if kind == "incompatible":
        raw = json.loads(config_path.read_text(encoding="utf-8"))
        raw["backbone"]["weights_sha256"] = "0" * 64
        raw["backbone"]["name"] = raw["backbone"]["name"] + "-other"
        config_path.write_text(json.dumps(raw, indent=2), encoding="utf-8")
        return None
    if kind in ("wrong_shape", "nonfinite"):
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
        return _rewrite_manifest(config_path, tensor_path)
    if kind == "missing_file":
        tensor_path.unlink()
        return None
    raise ValueError(f"unknown bad snapshot kind {kind!r}")


def _rewrite_manifest(config_path: Path, tensor_path: Path) -> str:
    """Make the manifest (and so the registry row) agree with the tensor file's new bytes."""
    sha = sha256_file(tensor_path)
    raw = json.loads(config_path.read_text(encoding="utf-8"))
    raw["tensors_sha256"] = sha
    raw["tensor_bytes"] = tensor_path.stat().st_size
    config_path.write_text(json.dumps(raw, indent=2), encoding="utf-8")
    return sha
