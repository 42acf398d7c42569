"""Typed response models (pydantic). Tolerant: fields the server adds later are kept, never rejected."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Activation",
    "Health",
    "ImageResult",
    "Info",
    "Label",
    "ModelsInfo",
    "Prediction",
    "PromptInfo",
    "TaskInfo",
    "TaskSubmission",
    "VersionInfo",
]

TASK_STATUSES = ("queued", "training", "evaluating", "live", "rejected", "failed")
TERMINAL_TASK_STATUSES = frozenset({"live", "rejected", "failed"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=())


class Label(_Model):
    """One scored label: ``label``, ``score`` in [0, 1], and the ``task`` that taught it."""

    label: str
    score: float
    task: str | None = None


class PromptInfo(_Model):
    """How the prompt was chosen for an image: ``mode`` (auto|none|task), the ``task`` and per-task ``weights``."""

    mode: str | None = None
    task: str | None = None
    weights: dict[str, float] | None = None


class ImageResult(_Model):
    """The answer for one image, in input order.

    ``model_version`` / ``snapshot_sha256`` say which version produced this result: a large input is sent
    in several requests and the server may swap versions between them, so each result keeps its own.
    """

    predictions: list[Label] = Field(default_factory=list)
    prompt: PromptInfo | None = None
    model_version: int | None = None
    snapshot_sha256: str | None = None

    @property
    def top(self) -> Label | None:
        """The best-scoring label, or None when there are none."""
        return self.predictions[0] if self.predictions else None


class Prediction(_Model):
    """``POST /predict``: one result per image, in order.

    ``model_version`` / ``snapshot_sha256`` are those of the last request made for this call (the version
    the server was serving when the call finished); ``model_versions`` lists every version that answered,
    and ``ImageResult.model_version`` says which one answered each image.
    """

    model_version: int | None = None
    snapshot_sha256: str | None = None
    results: list[ImageResult] = Field(default_factory=list)

    @property
    def model_versions(self) -> list[int | None]:
        """Distinct versions that produced the results, in order of first appearance."""
        seen: list[int | None] = []
        for result in self.results:
            if result.model_version not in seen:
                seen.append(result.model_version)
        return seen

    @property
    def mixed_versions(self) -> bool:
        """True when the server swapped versions between this call's requests."""
        return len(self.model_versions) > 1

    @property
    def labels(self) -> list[str | None]:
        """The top label of each image (None where an image got no prediction)."""
        return [r.top.label if r.top else None for r in self.results]


class TaskSubmission(_Model):
    """``POST /tasks``: the new task (202), or for a repeated idempotency key the one stored then (200,
    ``replayed`` True)."""

    id: str
    status: str = "queued"
    url: str | None = None
    replayed: bool = False


class TaskInfo(_Model):
    """``GET /tasks/{id}``. ``status`` is one of queued|training|evaluating|live|rejected|failed;
    ``progress`` holds epoch, epochs, step, steps, loss; ``version`` is set once a version was published."""

    id: str
    name: str = ""
    kind: str = "class"
    status: str
    progress: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    version: int | None = None
    error: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    classes: list[str] = Field(default_factory=list)
    num_train: int | None = None
    num_eval: int | None = None
    attempts: int | None = None

    @property
    def done(self) -> bool:
        """True once the task will not change status on its own (live, rejected, failed)."""
        return self.status in TERMINAL_TASK_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "live"


class VersionInfo(_Model):
    """One published version with its evaluation ``card``; ``state`` is candidate|live|rejected|retired."""

    version: int
    sha256: str | None = None
    state: str | None = None
    tasks: list[str] = Field(default_factory=list)
    card: dict[str, Any] = Field(default_factory=dict)
    parent: int | None = None
    created_at: str | None = None
    adapter_bytes: int | None = None
    task_id: str | None = None


class ModelsInfo(_Model):
    """``GET /models``: the ``live`` version (registry pointer), the version this replica is ``serving``,
    and every version."""

    live: int | None = None
    serving: int | None = None
    versions: list[VersionInfo] = Field(default_factory=list)

    def get(self, version: int) -> VersionInfo | None:
        """The version with this number, or None."""
        return next((v for v in self.versions if v.version == version), None)


class Health(_Model):
    """``GET /healthz``: the process is up (not necessarily ready to predict)."""

    status: str = "ok"


class Activation(_Model):
    """``POST /models/{v}/activate``: the ``live`` version now, the version this replica is ``serving`` after
    reloading, the activated ``version`` with its card, and a ``warning`` when the replica could not switch."""

    live: int
    serving: int | None = None
    version: VersionInfo | None = None
    warning: str | None = None


class Info(_Model):
    """``GET /info``: library version, backbone, device, what this replica serves, request limits, auth mode."""

    name: str | None = None
    version: str | None = None
    backbone: str | None = None
    device: str | None = None
    dtype: str | None = None
    backend: str | None = None
    ready: bool | None = None
    serving_version: int | None = None
    serving_sha256: str | None = None
    live_version: int | None = None
    training_worker: str | None = None  # the worker holding the training lease; None: queued tasks wait
    labels: int | None = None
    tasks: list[str] = Field(default_factory=list)
    limits: dict[str, Any] = Field(default_factory=dict)
    auth: dict[str, bool] = Field(default_factory=dict)  # disabled, admin_enabled, api_key_required
