"""Publishing a version: the one path by which a model's adapter becomes a registry version.

Write the snapshot (and the worker state) into a local staging directory, read it back as a server
will, store its objects, then record them with their sha256 in one registry transaction. The
worker, the benchmarks and the tests all publish through here.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from fmlora.errors import SnapshotExistsError, SnapshotIntegrityError
from fmlora.model.model import FMLoRAModel
from fmlora.model.snapshot import TENSOR_FILE, read_snapshot, save_snapshot

from .records import WORKER_STATE_OBJECT, VersionInfo
from .registry import Registry
from .worker_state import write_worker_state

__all__ = ["publish_version"]


def publish_version(
    registry: Registry,
    model: FMLoRAModel,
    *,
    card: dict[str, Any],
    parent: int | None,
    task_id: str | None = None,
    accepted: bool = True,
    lease_owner: str | None = None,
    hook: Callable[[str, int], None] | None = None,
    worker_state: Mapping[str, torch.Tensor] | None = None,
    worker_state_meta: Mapping[str, Any] | None = None,
) -> VersionInfo:
    """Publish ``model``'s adapter (and ``worker_state``, tensors plus a small JSON dict, if given)
    as the registry's next version, live when ``accepted``.

    The objects are stored before the row that makes them visible; a failure anywhere (the store
    unreachable, the lease lost) deletes whatever was stored, records nothing and raises.
    ``hook(stage, version)`` is called at "publishing" (before writing) and "written" (stored, not
    yet recorded); the worker's crash tests stop the process there.
    """
    version = registry.reserve_version(lease_owner)
    prefix = f"snapshots/v{version}"
    if hook is not None:
        hook("publishing", version)
    registry.scratch_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".publish-v{version}.", dir=registry.scratch_dir))
    stored = False
    try:
        directory = scratch / f"v{version}"
        manifest = save_snapshot(model, directory, version=version, parent_version=parent, card=card)
        if worker_state is not None:
            write_worker_state(directory / WORKER_STATE_OBJECT, worker_state, worker_state_meta)
        if read_snapshot(directory).manifest.tensors_sha256 != manifest.tensors_sha256:
            raise SnapshotIntegrityError(f"snapshot v{version} changed between writing and verifying")
        stored = True  # from here on, some of the objects may be in the store
        try:
            objects = registry.store.put_dir(prefix, directory, consume=True)
        except SnapshotExistsError:
            stored = False  # someone else's objects: never delete them
            raise
        if objects.get(TENSOR_FILE) != manifest.tensors_sha256:
            raise SnapshotIntegrityError(f"snapshot v{version} changed while it was stored")
        if hook is not None:
            hook("written", version)
        return registry.record_version(
            version=version,
            parent=parent,
            sha256=manifest.tensors_sha256,
            tasks=[t.name for t in model.tasks],
            card=card,
            adapter_bytes=manifest.adapter_bytes,
            task_id=task_id,
            accepted=accepted,
            lease_owner=lease_owner,
            objects=objects,
        )
    except BaseException:
        if stored:
            # The store may be away: recover() removes the unrecorded objects later.
            with contextlib.suppress(Exception):
                registry.store.delete_prefix(prefix)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
