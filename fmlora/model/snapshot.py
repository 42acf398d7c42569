"""Snapshots: the adapter as two immutable files, written atomically and verified before use.

    <dir>/adapter_model.safetensors   tensors only (bases, folded cores, prompt bank and keys,
                                      task keys, task feature means, head)
    <dir>/adapter_config.json         manifest: format, backbone fingerprint, config, labels, tasks,
                                      sha256 of the tensor file, evaluation card

Nothing is pickled. Loading reads and checks everything (hash, keys, shapes, backbone, layout)
before the model is touched, so a bad snapshot leaves the serving model as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from fmlora._version import __version__
from fmlora.errors import (
    SnapshotCompatibilityError,
    SnapshotExistsError,
    SnapshotFormatError,
    SnapshotIntegrityError,
)

from .config import ModelConfig
from .model import FMLoRAModel, TaskRecord

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "TENSOR_FILE",
    "BackboneInfo",
    "Snapshot",
    "SnapshotManifest",
    "check_compatible",
    "fsync_path",
    "load_snapshot",
    "read_snapshot",
    "save_snapshot",
    "sha256_file",
]

FORMAT_VERSION = 1
TENSOR_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


class BackboneInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    weights_sha256: str
    embed_dim: int
    depth: int


class SnapshotManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int
    library_version: str
    backbone: BackboneInfo
    # What inference depends on; two configs with equal layouts can share snapshots.
    adapter: dict[str, Any]
    # The full model config the snapshot was trained with, for provenance only.
    trained_with: dict[str, Any] = Field(default_factory=dict)
    labels: list[str]
    label_tasks: list[str]
    tasks: list[TaskRecord]
    version: int | None = None
    parent_version: int | None = None
    created_at: str
    tensors_sha256: str
    tensor_bytes: int
    adapter_bytes: int
    card: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """A snapshot read from disk and verified, not yet applied to any model."""

    path: Path
    manifest: SnapshotManifest
    tensors: dict[str, torch.Tensor]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _layout(config: ModelConfig, depth: int) -> dict[str, Any]:
    """The settings that change what a snapshot's tensors mean (training-only settings excluded)."""
    a, p = config.adapter, config.prompts
    layout = {
        "targets": list(a.targets),
        "rank": a.rank,
        "alpha": a.alpha,
        "task_factors": a.task_factors,
        "prompts": None,
        "backbone_kwargs": config.backbone.model_kwargs,
        "data_config_overrides": config.backbone.data_config_overrides,
        "input_norm": config.backbone.input_norm,
    }
    if config.head.kind != "linear":
        # Only non-default heads add a key, so snapshots written before heads had a config still load.
        # The rows' storage precision does not change what they mean (every loader casts them).
        layout["head"] = config.head.model_dump(mode="json", exclude={"solved_row_dtype"})
    if p.enabled:
        start, end = p.block_range(depth)
        layout["prompts"] = {
            "bank_size": p.bank_size,
            "length": p.length,
            "blocks": [start, end],
            "temperature": p.temperature,
        }
    return json.loads(json.dumps(layout))


def _adapter_bytes(tensors: dict[str, torch.Tensor]) -> int:
    constant = ("adapter.", "prompts.bank", "prompts.keys")
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(constant))


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path (a directory: so a rename into it is durable)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_snapshot(
    model: FMLoRAModel,
    directory: str | Path,
    *,
    version: int | None = None,
    parent_version: int | None = None,
    card: dict[str, Any] | None = None,
) -> SnapshotManifest:
    """Write the model's adapter to ``directory``, which must not exist yet.

    Both files are written into a sibling temporary directory, flushed, then the directory is
    renamed into place: readers see a complete snapshot or none.
    """
    target = Path(directory)
    if target.exists():
        raise SnapshotExistsError(f"snapshot {target} already exists; published snapshots are immutable")
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = model.adapter_tensors()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tensor_path = staging / TENSOR_FILE
        save_file(tensors, str(tensor_path), metadata={"format": "fmlora", "format_version": str(FORMAT_VERSION)})
        with tensor_path.open("rb+") as fh:
            os.fsync(fh.fileno())
        manifest = SnapshotManifest(
            format_version=FORMAT_VERSION,
            library_version=__version__,
            backbone=BackboneInfo(
                name=model.config.backbone.name,
                weights_sha256=model.backbone_sha256,
                embed_dim=model.embed_dim,
                depth=model.depth,
            ),
            adapter=_layout(model.config, model.depth),
            trained_with=model.config.model_dump(mode="json"),
            labels=list(model.head.labels),
            label_tasks=list(model.head.label_tasks),
            tasks=list(model.tasks),
            version=version,
            parent_version=parent_version,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            tensors_sha256=sha256_file(tensor_path),
            tensor_bytes=tensor_path.stat().st_size,
            adapter_bytes=_adapter_bytes(tensors),
            card=dict(card or {}),
        )
        config_path = staging / CONFIG_FILE
        with config_path.open("w", encoding="utf-8") as fh:
            fh.write(manifest.model_dump_json(indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        fsync_path(staging)
        # rename(2) would silently replace an empty directory created meanwhile; publishers are
        # serialised by the registry's lock, this check catches everyone else.
        if target.exists():
            raise SnapshotExistsError(f"snapshot {target} appeared while it was being written")
        try:
            os.rename(staging, target)
        except OSError as exc:
            raise SnapshotExistsError(f"cannot publish {target}: {exc}") from exc
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def read_snapshot(directory: str | Path) -> Snapshot:
    """Read and verify a snapshot (hash, format) without touching any model."""
    path = Path(directory)
    config_path, tensor_path = path / CONFIG_FILE, path / TENSOR_FILE
    if not config_path.is_file() or not tensor_path.is_file():
        raise SnapshotFormatError(f"{path} is not a snapshot: it needs {CONFIG_FILE} and {TENSOR_FILE}")
    try:
        manifest = SnapshotManifest.model_validate_json(config_path.read_bytes())
    except (ValidationError, ValueError, OSError) as exc:
        raise SnapshotFormatError(f"{config_path} is not a valid manifest: {exc}") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise SnapshotCompatibilityError(
            f"snapshot format {manifest.format_version} is not supported (this library reads {FORMAT_VERSION})"
        )
    # Hash exactly the bytes that are parsed: the file may change between two reads.
    try:
        data = tensor_path.read_bytes()
    except OSError as exc:
        raise SnapshotFormatError(f"{tensor_path} cannot be read: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != manifest.tensors_sha256:
        raise SnapshotIntegrityError(
            f"{tensor_path} is corrupt or was modified: sha256 {actual[:12]}… != recorded "
            f"{manifest.tensors_sha256[:12]}…"
        )
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as exc:
        raise SnapshotFormatError(f"{tensor_path} cannot be parsed: {exc}") from exc
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise SnapshotFormatError(f"snapshot tensor {name} is not a finite floating-point tensor")
    if len(manifest.labels) != len(manifest.label_tasks):
        raise SnapshotFormatError("manifest labels and label_tasks differ in length")
    return Snapshot(path=path, manifest=manifest, tensors=tensors)


def check_compatible(snapshot: Snapshot, model: FMLoRAModel) -> None:
    """Raise unless ``snapshot`` was made for this backbone and adapter layout, with every tensor."""
    m = snapshot.manifest
    if m.backbone.name != model.config.backbone.name or m.backbone.weights_sha256 != model.backbone_sha256:
        raise SnapshotCompatibilityError(
            f"snapshot was trained on backbone {m.backbone.name!r} (weights {m.backbone.weights_sha256[:12]}…), "
            f"this model runs {model.config.backbone.name!r} (weights {model.backbone_sha256[:12]}…)"
        )
    layout = _layout(model.config, model.depth)
    if m.adapter != layout:
        differing = sorted(k for k in layout if m.adapter.get(k) != layout[k])
        raise SnapshotCompatibilityError(f"snapshot adapter layout differs from this model's in: {differing}")
    expected = model.expected_tensor_shapes(len(m.labels), len(m.tasks))
    missing = sorted(set(expected) - set(snapshot.tensors))
    extra = sorted(set(snapshot.tensors) - set(expected))
    if missing or extra:
        raise SnapshotFormatError(f"snapshot tensors missing {missing[:5]} / unexpected {extra[:5]}")
    for name, shape in expected.items():
        got = tuple(snapshot.tensors[name].shape)
        if got != shape:
            raise SnapshotFormatError(f"snapshot tensor {name} has shape {got}, expected {shape}")


def load_snapshot(model: FMLoRAModel, directory: str | Path) -> SnapshotManifest:
    """Verify a snapshot completely, then replace ``model``'s adapter state with it."""
    snapshot = read_snapshot(directory)
    check_compatible(snapshot, model)
    m = snapshot.manifest
    model.load_adapter_state(snapshot.tensors, m.tasks, m.labels, m.label_tasks)
    return m
