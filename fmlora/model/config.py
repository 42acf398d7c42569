"""Typed, frozen configuration for the backbone, the adapter, the rank selector and the prompts.

Every design choice that is ours rather than the paper's (see ARCHITECTURE.md §2) is a field here, so that
ablations can switch it off and measure it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fmlora.errors import ConfigError

__all__ = [
    "OFFLINE_MODEL_KWARGS",
    "OFFLINE_WEIGHTS",
    "AdapterConfig",
    "BackboneConfig",
    "FrozenConfig",
    "HeadConfig",
    "ModelConfig",
    "PromptConfig",
    "RankSelectorConfig",
    "override_backbone",
    "parse_config",
]


class FrozenConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        # Callers catch one library error type, not pydantic's.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(str(exc)) from None


# The offline default backbone: a 32-px ViT (patch 4, width 128, depth 4) pre-trained by
# `fmlora pretrain` on glyphs disjoint from the benchmark's, shipped inside the package.
OFFLINE_WEIGHTS = Path(__file__).parent.parent / "assets" / "glyph-vit-s32.safetensors"
OFFLINE_MODEL_KWARGS: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 4,
    "embed_dim": 128,
    "depth": 4,
    "num_heads": 2,
    "init_values": 0.1,
}


class BackboneConfig(FrozenConfig):
    """Which timm Vision Transformer to wrap and where its weights come from.

    ``weights``: ``pretrained`` uses timm's own download path (needs the internet or a warm cache),
    ``file`` loads ``weights_path`` (safetensors, or .pth/.npz read without pickle), ``random`` keeps
    timm's random initialisation and must be asked for explicitly. ``BackboneConfig.offline()`` is the
    shipped glyph ViT, which ``ModelConfig`` uses when no backbone is given.
    """

    name: str = "vit_base_patch16_224.augreg_in21k"
    weights: Literal["pretrained", "file", "random"] = "pretrained"
    weights_path: Path | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    # Overrides of timm's data config (e.g. mean=(0,0,0), std=(1,1,1) to match InfLoRA's protocol).
    data_config_overrides: dict[str, Any] = Field(default_factory=dict)
    # "timm": normalise with the data config's mean/std. "per-image": parameter-free standardisation
    # (grey level, minus the image's median, over its std, strokes positive) for backbones trained so,
    # like the offline glyph ViT; it has no constants to get wrong.
    input_norm: Literal["timm", "per-image"] = "timm"

    @classmethod
    def offline(cls) -> BackboneConfig:
        """The shipped glyph ViT: the default backbone whenever no other is configured."""
        return cls(
            name="vit_tiny_patch16_224",
            weights="file",
            weights_path=OFFLINE_WEIGHTS,
            model_kwargs=dict(OFFLINE_MODEL_KWARGS),
            input_norm="per-image",
        )

    @model_validator(mode="after")
    def _weights_path_matches_source(self) -> BackboneConfig:
        if self.weights == "file" and self.weights_path is None:
            raise ValueError("weights='file' needs weights_path")
        if self.weights != "file" and self.weights_path is not None:
            raise ValueError("weights_path is only used with weights='file'")
        return self


QKV_PARTS = ("q", "k", "v")


def override_backbone(base: BackboneConfig, name: str | None, weights: str | None) -> BackboneConfig:
    """Change the model and/or its weights, keeping what still applies (e.g. the paper protocol's
    unnormalised pixels). ``weights``: 'pretrained', 'random' or a local file."""
    update: dict[str, Any] = {}
    if name is not None and name != base.name:
        update["name"] = name
        if base.input_norm == "per-image":  # the glyph ViT's architecture and input norm are its own
            update.update(model_kwargs={}, input_norm="timm")
        if weights is None:
            update.update(weights="pretrained", weights_path=None)
    if weights in ("pretrained", "random"):
        update.update(weights=weights, weights_path=None)
    elif weights is not None:
        update.update(weights="file", weights_path=Path(weights))
    return base.model_copy(update=update) if update else base


class AdapterConfig(FrozenConfig):
    """F-LoRA layers: which matrices, which rank, and how bases and task factors train."""

    # Module-name suffixes; ``attn.qkv[q]`` adapts only the query rows of the fused qkv projection.
    targets: tuple[str, ...] = ("attn.qkv[q]", "attn.qkv[k]", "attn.qkv[v]")
    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    # first_task: bases A, B train on the first task, then freeze (FM-LoRA). every_task: plain LoRA.
    train_bases: Literal["first_task", "every_task"] = "first_task"
    # False disables M_t, N_t and folding: the adapter is then ordinary LoRA B A (sequential baseline).
    task_factors: bool = True
    # Std of M_t's entries for tasks after the first, in units of 1/sqrt(rank).
    factor_init_scale: float = Field(1.0, gt=0)

    @field_validator("targets")
    @classmethod
    def _valid_targets(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        if not targets:
            raise ValueError("at least one adapter target is required")
        for target in targets:
            name, _, part = target.partition("[")
            if not name or (part and part.rstrip("]") not in QKV_PARTS) or (part and not part.endswith("]")):
                raise ValueError(f"bad adapter target {target!r}; use e.g. 'attn.proj' or 'attn.qkv[q]'")
        if len(set(targets)) != len(targets):
            raise ValueError("adapter targets must be unique")
        return targets

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class RankSelectorConfig(FrozenConfig):
    """Dynamic rank selection (DRS): a prior from task complexity/novelty, Gumbel-Softmax over ranks."""

    enabled: bool = True
    # Candidate ranks as fractions of AdapterConfig.rank.
    candidates: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    complexity_weight: float = Field(0.7, ge=0)
    novelty_weight: float = Field(0.3, ge=0)
    # How sharply the prior prefers the candidate nearest the task's target capacity.
    prior_sharpness: float = Field(8.0, gt=0)
    tau_start: float = Field(1.0, gt=0)
    tau_end: float = Field(0.1, gt=0)
    # Weight of the expected-rank penalty (fraction of the full rank) in the loss.
    rank_penalty: float = Field(0.0, ge=0)

    @field_validator("candidates")
    @classmethod
    def _valid_candidates(cls, candidates: tuple[float, ...]) -> tuple[float, ...]:
        if not candidates or any(not 0 < c <= 1 for c in candidates):
            raise ValueError("rank candidates must be fractions in (0, 1]")
        return tuple(sorted(set(candidates)))


class PromptConfig(FrozenConfig):
    """Dynamic meta-prompts (DMP): a fixed bank of prefix key/value prompts mixed per input."""

    enabled: bool = True
    bank_size: int = Field(8, ge=1)
    length: int = Field(8, ge=1)
    # Blocks [start_block, end_block) receive prefixes; None picks block 1 .. half the depth.
    start_block: int | None = Field(None, ge=0)
    end_block: int | None = Field(None, ge=1)
    temperature: float = Field(0.1, gt=0)
    # Penalty on squared drift of the bank and its keys from their values before the current task.
    drift_penalty: float = Field(1.0, ge=0)
    init_std: float = Field(0.02, gt=0)

    def block_range(self, depth: int) -> tuple[int, int]:
        start = 1 if self.start_block is None else self.start_block
        end = max(start + 1, 1 + (depth - 1) // 2) if self.end_block is None else self.end_block
        if not 0 <= start < end <= depth:
            raise ConfigError(f"prompt blocks [{start}, {end}) do not fit a backbone of depth {depth}")
        return start, end


class HeadConfig(FrozenConfig):
    """The classifier over the backbone's features.

    ``linear``: rows over the pre-logit features, trained by gradient descent task by task.
    ``ridge``: rows over ``random_features`` ReLU random features of them (the projection is
    regenerated from ``projection_seed``, never stored), solved in closed form from class statistics
    after every task (ARCHITECTURE.md §2, "The solved head").
    """

    kind: Literal["linear", "ridge"] = "ridge"
    random_features: int = Field(4000, ge=1)
    projection_seed: int = 0
    # How solved rows are kept and published: "float16" rounds them once, when they are solved (the
    # model in memory is then exactly the one served), and halves the head's share of a snapshot.
    # Rows that would overflow float16, and trained (linear) rows, stay float32.
    solved_row_dtype: Literal["float32", "float16"] = "float16"


class ModelConfig(FrozenConfig):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig.offline)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    rank_selector: RankSelectorConfig = Field(default_factory=RankSelectorConfig)
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    head_init_std: float = Field(0.02, gt=0)


def parse_config(model: type[FrozenConfig], data: dict[str, Any]) -> Any:
    """Validate a plain dict into a config, raising ConfigError with pydantic's explanation."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(str(exc)) from exc
