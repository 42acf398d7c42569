"""What the worker carries from one version to the next: class statistics, never images.

- ``ridge``: the ridge head's statistics (counts, feature sums, Gram and cross matrices of the random
  features), which the next task adds to and re-solves the head from (ARCHITECTURE.md §2).
- ``held_out``: the same statistics of the gate's held-out images of every task whose candidate
  passed the gate. The served head is solved from ``ridge`` and ``held_out`` together; λ's choice,
  the next task's training and every later gate see ``ridge`` only, so no gate ever scores a head
  that was fitted to the images it is scored on (``WorkerConfig.fold_in_held_out``).
- ``baseline``: per-class counts and sums of the *frozen* backbone's features, for the training-free
  nearest-class-mean baseline the promotion gate compares every candidate with.

All grow per class only. They are published with the version they belong to, so a rollback
restores them; the registry verifies their sha256 before they are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fmlora.errors import DataError, WorkerStateError
from fmlora.model.model import FMLoRAModel
from fmlora.registry.worker_state import WorkerState
from fmlora.training.learner import new_statistics
from fmlora.training.statistics import ClassStatistics

__all__ = ["ClassState", "pack_state", "unpack_state"]


@dataclass
class ClassState:
    ridge: ClassStatistics | None
    baseline: ClassStatistics
    held_out: ClassStatistics | None = None


def _empty(model: FMLoRAModel) -> ClassState:
    ridge = new_statistics(model) if model.head.feature_map is not None else None
    held_out = new_statistics(model) if model.head.feature_map is not None else None
    return ClassState(ridge, ClassStatistics(model.embed_dim, keep_gram=False), held_out)


def unpack_state(state: WorkerState | None, model: FMLoRAModel) -> ClassState:
    """The parent version's class statistics for ``model`` (empty for the first version, or for a
    parent published before statistics existed)."""
    if state is None or not state.tensors:
        return _empty(model)

    def part(prefix: str, random_features: object) -> ClassStatistics | None:
        tensors = {k.removeprefix(prefix + "."): v for k, v in state.tensors.items() if k.startswith(prefix + ".")}
        meta = state.meta.get(prefix)
        if not tensors or not isinstance(meta, dict):
            return None
        try:
            return ClassStatistics.from_tensors(tensors, meta, random_features)  # type: ignore[arg-type]
        except DataError as exc:
            raise WorkerStateError(f"the parent version's {prefix} statistics cannot be used: {exc}") from exc

    empty = _empty(model)
    ridge = part("ridge", model.head.feature_map) if empty.ridge is not None else None
    # State published before held-out images joined the head has none: they start from here.
    held_out = part("held_out", model.head.feature_map) if empty.held_out is not None else None
    baseline = part("baseline", None)
    return ClassState(
        ridge if ridge is not None else empty.ridge,
        baseline if baseline is not None else empty.baseline,
        held_out if held_out is not None else empty.held_out,
    )


def pack_state(state: ClassState) -> WorkerState:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, object] = {}
    # Empty held-out statistics are not stored (a worker that never folds them in pays nothing).
    held_out = state.held_out if state.held_out is not None and state.held_out.labels else None
    parts = (("ridge", state.ridge, torch.float64), ("baseline", state.baseline, torch.float64))
    # The held-out statistics are only solved at the λ the training images chose (never scored over
    # small λ, where float32 changes the hits): their G in float32 saves 32 MB a version.
    for prefix, stats, gram_dtype in (*parts, ("held_out", held_out, torch.float32)):
        if stats is None:
            continue
        part, part_meta = stats.to_tensors(gram_dtype)
        tensors.update({f"{prefix}.{k}": v for k, v in part.items()})
        meta[prefix] = part_meta
    return WorkerState(tensors, meta)
