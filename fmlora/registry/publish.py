"""Publishing a version: the one path by which a model's adapter becomes a registry version.

Write beside the target and rename (``save_snapshot``), read it back as a server will, then record
it in one registry transaction. The worker, the benchmarks and the tests all publish through here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fmlora.errors import SnapshotIntegrityError
from fmlora.model.model import FMLoRAModel
from fmlora.model.snapshot import read_snapshot, save_snapshot

from .registry import Registry, VersionInfo

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
) -> VersionInfo:
    """Publish ``model``'s adapter as the registry's next version: write beside and rename
    (``save_snapshot``), read it back as a server will, then record it (live when ``accepted``).

    A failure after the rename removes the unrecorded directory, so nothing unrecorded stays
    visible. ``hook(stage, version)`` is called at "publishing" (before writing) and "written"
    (renamed, not yet recorded); the worker's crash tests stop the process there.
    """
    version = registry.next_version()
    directory = registry.snapshot_dir(version)
    if hook is not None:
        hook("publishing", version)
    manifest = save_snapshot(model, directory, version=version, parent_version=parent, card=card)
    try:
        if hook is not None:
            hook("written", version)
        if read_snapshot(directory).manifest.tensors_sha256 != manifest.tensors_sha256:
            raise SnapshotIntegrityError(f"snapshot v{version} changed between writing and verifying")
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
        )
    except BaseException:
        registry.remove_snapshot_dir(directory)
        raise
