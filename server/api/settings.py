"""Server settings: every knob is an environment variable with the ``FMLORA_`` prefix.

``Settings()`` reads the environment (no ``.env`` file is read unless one is passed as ``_env_file``);
tests and embedders pass values directly: ``Settings(home=tmp, admin_key="...")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["MIN_KEY_LENGTH", "EmbeddedWorkerSettings", "Settings"]

MIN_KEY_LENGTH = 16
MiB = 2**20


class Settings(BaseSettings):
    """Configuration of one server process (one engine, one registry home)."""

    model_config = SettingsConfigDict(
        env_prefix="FMLORA_",
        extra="ignore",
        frozen=True,
        protected_namespaces=(),
        validate_default=True,
        hide_input_in_errors=True,  # keys must never appear in an error message
    )

    # -- where and what ----------------------------------------------------------------------
    home: Path = Field(
        Path("fmlora-home"),
        description="This host's registry directory: registry.db and snapshots by default, else the local cache.",
    )
    registry_url: SecretStr | None = Field(
        None,
        description="sqlite:///path/registry.db (default: HOME/registry.db) or postgresql://user[:password]@host:port/db.",
    )
    store_url: str | None = Field(
        None, description="file:///path (default: HOME) or s3://bucket/prefix for snapshots and task archives."
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, ...); credentials come from the standard AWS variables."
    )
    s3_region: str | None = Field(None, description="S3 region (default: the AWS variables / config).")
    s3_addressing_style: Literal["path", "virtual", "auto"] | None = Field(
        None, description="S3 addressing style ('path' for most self-hosted endpoints)."
    )
    model_config_file: Path | None = Field(
        None,
        description="JSON ModelConfig used when HOME is created (default: the shipped offline glyph ViT); "
        "an existing HOME keeps the configuration it was created with.",
    )
    backbone: str | None = Field(
        None, description="timm model name for a NEW home (default: the offline glyph ViT); as `fmlora worker`."
    )
    backbone_weights: str | None = Field(
        None, description="'pretrained', 'random' or a local weight file, for --backbone in a NEW home."
    )
    host: str = Field("127.0.0.1", description="Interface to listen on (fmlora serve).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (fmlora serve; 0 picks a free one).")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the server and uvicorn (fmlora serve)."
    )

    # -- engine ----------------------------------------------------------------------------------
    device: str = Field("auto", description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' = bfloat16 on GPU, float32 on CPU."
    )
    backend: Literal["torch", "onnx"] = Field("torch", description="Inference backend (onnx: CPU only).")
    max_batch_size: int = Field(32, ge=1, le=4096, description="Most images in one forward pass.")
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        le=10_000,
        description="How long a batch may wait to fill up; 0 = greedy: a batch starts as soon as the inference "
        "thread is free, and requests arriving meanwhile form the next one.",
    )
    max_queue: int = Field(256, ge=1, description="Images waiting for the model; beyond it requests get 429.")
    request_timeout_s: float = Field(30.0, gt=0, description="Per-request deadline (decode, queue, inference).")
    cached_versions: int = Field(4, ge=1, description="Versions kept in memory for pinning and instant rollback.")
    poll_interval_s: float = Field(0.5, gt=0, description="How often the registry's live pointer is checked.")
    registry_notify: bool = Field(
        True,
        description="On PostgreSQL, learn of new versions through LISTEN/NOTIFY (polling stays the fallback).",
    )
    follow_registry: bool = Field(
        True,
        description="Follow the registry's live pointer (poll it, and reload on activation). False: keep serving "
        "the version live at start whatever the registry says (a frozen replica; the swap benchmark's control run).",
    )

    # -- limits ----------------------------------------------------------------------------------
    max_images_per_request: int = Field(32, ge=1, le=10_000, description="Images in one POST /predict.")
    max_body_bytes: int = Field(32 * MiB, ge=1024, description="Largest request body (except task uploads).")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest decoded image (width x height), predictions and uploads alike."
    )
    max_archive_bytes: int = Field(512 * MiB, ge=1024, description="Largest task archive upload.")
    max_archive_files: int = Field(50_000, ge=1, description="Most files in one task archive.")
    max_unpacked_bytes: int = Field(2 * 2**30, ge=1024, description="Most bytes a task archive may unpack to.")

    # -- security --------------------------------------------------------------------------------
    admin_key: SecretStr | None = Field(
        None, description="Bearer key for POST /tasks and activation; without it those routes answer 403."
    )
    api_key: SecretStr | None = Field(
        None, description="When set, predictions and reads need this key (or the admin key)."
    )
    auth_disabled: bool = Field(False, description="Local use only: no key is checked anywhere.")
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins (JSON list); off if empty.")

    # -- lifecycle -------------------------------------------------------------------------------
    shutdown_timeout_s: float = Field(30.0, ge=0, description="Grace period for in-flight requests on SIGTERM.")
    embedded_worker: bool = Field(True, description="fmlora serve also runs a training worker.")

    @field_validator("admin_key", "api_key", "registry_url", "store_url", "s3_endpoint_url", "s3_region", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("admin_key", "api_key")
    @classmethod
    def _key_strength(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value()
        if len(secret) < MIN_KEY_LENGTH or not secret.isprintable() or any(c.isspace() for c in secret):
            # The message never contains the key.
            raise ValueError(f"keys must be at least {MIN_KEY_LENGTH} printable characters without spaces")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("device must be 'auto', 'cpu', 'cuda' or 'cuda:N'")

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_queue < self.max_images_per_request:
            raise ValueError("max_queue must be at least max_images_per_request, or large requests could never run")
        return self

    @property
    def registry_url_value(self) -> str | None:
        return self.registry_url.get_secret_value() if self.registry_url is not None else None

    @property
    def auth_summary(self) -> dict[str, bool]:
        return {
            "disabled": self.auth_disabled,
            "admin_enabled": self.auth_disabled or self.admin_key is not None,
            "api_key_required": not self.auth_disabled and self.api_key is not None,
        }


class EmbeddedWorkerSettings(BaseSettings):
    """Training knobs of the worker that ``fmlora serve`` embeds: the same environment variables as
    ``fmlora worker`` (FMLORA_WORKER_EPOCHS, FMLORA_GATE_MAX_FORGETTING, ...)."""

    model_config = SettingsConfigDict(env_prefix="FMLORA_", extra="ignore", frozen=True)

    worker_epochs: int = Field(5, ge=1, description="Epochs per task.")
    worker_batch_size: int = Field(32, ge=1, description="Training batch size.")
    worker_lr: float = Field(2e-3, gt=0, description="Learning rate.")
    worker_autocast: Literal["bfloat16", "float16", "none"] = Field("none", description="Training autocast.")
    worker_device: str | None = Field(None, description="torch device for training (default: cuda if available).")
    worker_statistics_views: int = Field(0, ge=0, description="Random resized crops per training image in the head.")
    worker_fold_in_held_out: bool = Field(True, description="Serve a head solved from the gate's images too.")
    gate_min_new_task_accuracy: float = Field(0.0, ge=0, le=1, description="Promotion gate: new-task accuracy.")
    gate_max_forgetting: float = Field(1.0, ge=0, le=1, description="Promotion gate: largest accuracy drop.")
    keep_versions: int | None = Field(None, ge=0, description="Retention: non-live versions kept (default: all).")
