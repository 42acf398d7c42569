"""Request and response bodies of the HTTP API (DESIGN.md §3). These models are the OpenAPI schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ActivateResponse",
    "ErrorBody",
    "ErrorDetail",
    "ErrorEnvelope",
    "HealthResponse",
    "ImageResultOut",
    "InfoResponse",
    "LabelScore",
    "ModelsResponse",
    "PredictRequest",
    "PredictResponse",
    "PromptSpec",
    "PromptUsed",
    "ReadyResponse",
    "TaskAccepted",
    "TaskList",
    "TaskOut",
    "TaskPrompt",
    "VersionOut",
]

TaskStatus = Literal["queued", "training", "evaluating", "live", "rejected", "failed"]
VersionState = Literal["candidate", "live", "rejected", "retired"]


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- errors --------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(description="Where the problem is, e.g. ['body', 'top_k'].")
    msg: str
    type: str


class ErrorBody(BaseModel):
    type: str = Field(description="Machine-readable snake_case error type, e.g. 'queue_full'.", examples=["not_found"])
    message: str = Field(description="What went wrong and what to do about it.")
    request_id: str = Field(description="Also sent as the X-Request-ID header; quote it when reporting a problem.")
    details: list[ErrorDetail] | None = Field(None, description="Per-field problems (validation errors only).")


class ErrorEnvelope(BaseModel):
    error: ErrorBody


# -- predict -------------------------------------------------------------------------------------
class TaskPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=200, description="Use this learned task's meta-prompt.")


PromptSpec = Literal["auto", "none"] | TaskPrompt


class PredictRequest(BaseModel):
    """JSON form of POST /predict."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(
        min_length=1,
        description="Base64-encoded image files (JPEG, PNG, WebP, ...); 'data:image/...;base64,' prefixes are "
        "accepted. At most FMLORA_MAX_IMAGES_PER_REQUEST (see GET /info).",
    )
    top_k: int = Field(5, ge=1, le=1000, description="Predictions per image (capped at the number of labels).")
    prompt: PromptSpec = Field(
        "auto",
        description="Meta-prompt selection: 'auto' (query-key attention), 'none', or {'task': NAME}.",
    )
    version: int | None = Field(None, ge=1, description="Pin a published version (default: the one served now).")


class PredictForm(BaseModel):
    """Form fields of the multipart form of POST /predict (validated like the JSON body)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(5, ge=1, le=1000)
    prompt: PromptSpec = "auto"
    version: int | None = Field(None, ge=1)


class LabelScore(_Out):
    label: str
    score: float = Field(description="Softmax probability over all labels of the served version.")
    task: str | None = Field(None, description="The task that taught this label.")


class PromptUsed(_Out):
    mode: str = Field(description="'auto', 'none' or 'task'.")
    task: str | None = Field(None, description="The chosen (or nearest) task's name.")
    weights: dict[str, float] | None = Field(None, description="Mixture weights over the prompt bank or tasks.")


class ImageResultOut(_Out):
    predictions: list[LabelScore]
    prompt: PromptUsed


class PredictResponse(_Out):
    model_version: int | None = Field(description="The version that produced every result of this response.")
    snapshot_sha256: str | None = Field(description="sha256 of that version's tensor file.")
    results: list[ImageResultOut] = Field(description="One result per image, in request order.")


# -- tasks ---------------------------------------------------------------------------------------
class TaskAccepted(_Out):
    id: str
    status: TaskStatus
    url: str = Field(description="Where to follow the task: GET this URL.")


class TaskOut(_Out):
    id: str
    name: str
    kind: Literal["class", "domain"]
    status: TaskStatus
    progress: dict[str, Any] = Field(description="epoch, epochs, step, steps, loss while training.")
    metrics: dict[str, Any] = Field(description="The evaluation card once evaluated.")
    version: int | None = Field(description="The version this task produced, once published or rejected.")
    error: str | None = Field(description="Why the task failed or was rejected.")
    classes: list[str]
    num_train: int
    num_eval: int
    attempts: int
    created_at: str
    updated_at: str


class TaskList(_Out):
    tasks: list[TaskOut] = Field(description="Newest first.")


# -- models --------------------------------------------------------------------------------------
class VersionOut(_Out):
    version: int
    parent: int | None
    sha256: str
    state: VersionState
    tasks: list[str]
    card: dict[str, Any] = Field(description="Evaluation card: per-task accuracy, final/average accuracy, forgetting.")
    created_at: str
    adapter_bytes: int
    task_id: str | None = None


class ModelsResponse(_Out):
    live: int | None = Field(description="The registry's live version.")
    serving: int | None = Field(description="The version this replica serves right now.")
    versions: list[VersionOut] = Field(description="Ascending by version.")


class ActivateResponse(_Out):
    live: int = Field(description="The registry's live version after the call.")
    serving: int | None = Field(description="The version this replica serves after reloading.")
    version: VersionOut
    warning: str | None = Field(None, description="Set when this replica could not switch to the live version.")


# -- health and info -----------------------------------------------------------------------------
class HealthResponse(_Out):
    status: Literal["ok"] = "ok"


class ReadyResponse(_Out):
    status: Literal["ready"] = "ready"
    serving_version: int | None
    dependencies: dict[str, str] = Field(
        default_factory=dict,
        description="registry: 'ok' or 'unreachable'; feed: 'notify', 'polling' or 'off'. A replica whose "
        "registry is unreachable stays ready and serves the version it holds.",
    )
    degraded: list[str] = Field(default_factory=list, description="Dependencies that are down (empty when none).")


class InfoResponse(_Out):
    name: str = "fmlora"
    version: str = Field(description="fmlora library version.")
    backbone: str
    device: str
    dtype: str
    backend: str
    ready: bool
    serving_version: int | None
    serving_sha256: str | None
    live_version: int | None
    training_worker: str | None = Field(
        None, description="The worker holding the training lease; null: none is attached, queued tasks wait."
    )
    labels: int = Field(description="Number of labels the served version knows.")
    tasks: list[str] = Field(description="Tasks the served version has learned, in order.")
    limits: dict[str, int | float]
    auth: dict[str, bool]
