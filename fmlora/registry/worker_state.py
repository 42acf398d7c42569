"""Per-version worker state: tensors and a small JSON dict the worker carries from one task to the
next (e.g. class statistics), stored beside the version's snapshot as one safetensors object.

It belongs to the version it was published with: the next task starts from the live version's
state, so activating an older version (a rollback) also rolls the state back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from fmlora.errors import WorkerStateError

__all__ = ["WorkerState", "parse_worker_state", "write_worker_state"]

_FORMAT = "fmlora-worker-state"


@dataclass(frozen=True)
class WorkerState:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


def write_worker_state(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> None:
    """Write the state to ``path`` (a new file; the caller publishes it)."""
    try:
        encoded_meta = json.dumps(dict(meta or {}), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise WorkerStateError(f"worker state meta must be JSON-serialisable: {exc}") from exc
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise WorkerStateError(f"worker state entry {name!r} is not a tensor")
    # Copies: safetensors refuses tensors that share storage or are not contiguous.
    plain = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}
    save_file(plain, str(path), metadata={"format": _FORMAT, "meta": encoded_meta})


def parse_worker_state(data: bytes, where: str) -> WorkerState:
    try:
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        metadata = header.get("__metadata__", {})
        if metadata.get("format") != _FORMAT:
            raise WorkerStateError(f"{where} is not an fmlora worker state")
        meta = json.loads(metadata.get("meta", "{}"))
    except (SafetensorError, ValueError) as exc:
        raise WorkerStateError(f"{where} cannot be parsed: {exc}") from exc
    return WorkerState(tensors=dict(tensors), meta=meta)
