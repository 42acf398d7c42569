"""Typed, frozen configuration of one task's training run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fmlora.model.config import FrozenConfig

__all__ = ["LambdaScoring", "LambdaSelection", "TrainConfig", "UnscoredWeighting"]

LambdaSelection = Literal["task", "cumulative"]
LambdaScoring = Literal["held_out", "leave_one_out"]
UnscoredWeighting = Literal["groups", "copies", "none"]


class TrainConfig(FrozenConfig):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)
    # The new head rows start from zero while earlier rows are trained; a faster head lets a short
    # task catch up (1.0 = one learning rate for everything, as the paper protocol uses).
    head_lr_scale: float = Field(1.0, gt=0)
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_fraction: float = Field(0.0, ge=0, lt=1)
    min_lr_fraction: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    seed: int = 0
    device: str = "cpu"
    # bfloat16 autocast speeds up CPUs with AVX512-BF16 and every recent GPU; None trains in fp32.
    autocast_dtype: Literal["bfloat16", "float16"] | None = None
    eval_batch_size: int = Field(128, ge=1)
    # Decode processes for every pass over a task's images (0: decode in this process), and timm's
    # training augmentation (random resized crop, flip, colour jitter) for the training passes; the
    # paper benchmarks use both so that a GPU is never starved by JPEG decoding.
    # How the adapter learns across tasks (ARCHITECTURE.md §2, "The solved head"): "continual" trains it on every task,
    # "first_task" only on the first (later tasks only add class statistics, as RanPAC), "none"
    # never (a solved head on the frozen backbone). Tasks after the first train at lr x later_lr_scale.
    # "on_demand": the first task, every domain-incremental task, and class-incremental tasks whose
    # classes the current features separate badly (novel, below); the others only add statistics.
    adaptation: Literal["continual", "on_demand", "first_task", "none"] = "on_demand"
    later_lr_scale: float = Field(0.1, gt=0)
    # The ridge head's training objective: scaled-cosine logits to class prototypes, plus a feature
    # distillation to the model before the task (weight 0: off) that bounds drift of earlier classes.
    prototype_scale: float = Field(16.0, gt=0)
    distill_weight: float = Field(1.0, ge=0)
    # After each adapted task, earlier classes' statistics are moved to the new features by an affine
    # map fitted on the task's own images (fmlora/training/drift.py); "none" keeps them as taken.
    drift_compensation: Literal["affine", "none"] = "affine"
    # "auto": a later task whose own classes the current features separate badly (nearest-class-mean
    # error on its training images >= novel_task_error) is novel; it trains at the full lr with the
    # shared bases open (full plasticity, drift compensated). "fixed": every later task as the rest.
    plasticity: Literal["auto", "fixed"] = "auto"
    novel_task_error: float = Field(0.5, gt=0, le=1)
    # A novel task trains at lr x novel_lr_scale, and with the shared bases open unless
    # novel_open_bases is off (research knobs: plasticity against forgetting of earlier classes).
    novel_lr_scale: float = Field(1.0, gt=0)
    novel_open_bases: bool = True
    drift_ridge: float = Field(0.1, ge=0)
    drift_samples: int = Field(32, ge=1)
    # How the ridge head's λ is chosen on training images (fmlora/training/statistics.py):
    # "cumulative" tallies every task's hits per candidate over the stream and takes the best of the
    # tally; "task" decides on this task's hits alone (RanPAC's recipe, the default until
    # 2026-12-03). A task's hits are all on its own, newest classes, so alone they can pick a λ
    # that fits those and costs the earlier ones (on glyphs-grating a last task's 0.01 took the
    # first task from 9 % to 4.5 %); the tally measured better there and level elsewhere (README).
    lambda_selection: LambdaSelection = "cumulative"
    # What each candidate λ is scored on: "leave_one_out" counts, for every image of the task (up to
    # 800), the hit of the whole head with that image left out (closed form, one solve per candidate);
    # "held_out" solves without a fifth of the task's images and counts hits on that fifth (RanPAC's
    # recipe, the default before 2026-12-03). Leave-one-out measured equal final accuracy on glyphs and
    # glyphs-dil, +0.75 on glyphs-grating, and higher average incremental accuracy on all three (README).
    lambda_scoring: LambdaScoring = "leave_one_out"
    # "task": None (default) is RanPAC's plain arg-max of the held-out hits (ties to the smaller λ); a
    # number takes the largest λ within that many standard errors of the best count instead
    # (``fmlora-lambda-se``: 0.5; measured better on glyphs-grating, worse on glyphs-dil, so off).
    lambda_tolerance: float | None = Field(None, ge=0)
    # The scored images are all of the task's own classes: this many features per earlier class,
    # drawn from its Gaussian (class mean, pooled covariance), join it, so λ also answers for them.
    lambda_old_class_samples: int = Field(0, ge=0)
    # "task": the held-out hits of each candidate averaged with its neighbours on the log-λ grid
    # (weights 1-2-1 over this many candidates either side) before the arg-max: a single λ that
    # wins by a hit or two between worse neighbours is more often noise than a real optimum.
    # 0 (default): no smoothing (``fmlora-lambda-smooth``: 1).
    lambda_smoothing: int = Field(0, ge=0)
    # λ scored on a head of only this many of the random features (exactly their block of the Gram
    # matrix), which is cheaper; None scores on the whole head. At 4,000 features a 2,000 block
    # picked too small a λ on glyphs-dil (README, "What did not work"), so None is the default.
    lambda_scoring_features: int | None = Field(None, ge=1)
    # Extra random-resized-crop views of every training image (fmlora/data/views.py), taken under
    # the trained model and added to the class statistics (how they count while λ is scored:
    # view_weighting). 0: the original images only (the default here and in the worker: README).
    statistics_views: int = Field(0, ge=0)
    view_scale: tuple[float, float] = (0.7, 1.0)
    # Views only for a task whose classes the features before it already separate: within-task
    # nearest-class-mean error on its training images below this (None: every task). A crop keeps
    # the label only where the features see the class and not a nuisance; on glyphs-grating, whose
    # tasks measure 0.34-0.87 (glyphs 0.04-0.25, glyphs-dil 0.16-0.31), crops change the grating's
    # period, and views on every task cost up to 2.4 points and 10 of forgetting (README, "Extra views").
    views_max_task_error: float | None = Field(0.33, gt=0, le=1)
    # How the views count while λ is scored (``ClassStatistics.add_task``): "groups" (default) puts
    # them in G and leaves each image out with its views, so λ is scored on what is solved; "none"
    # scores without them (outweighed by earlier tasks' views: on glyphs-grating that chose λ <= 0.03
    # from the second task on and forgot 28 points); "copies" without them, each image counted
    # 1 + statistics_views times (too large a λ on glyphs). README, "Extra views".
    view_weighting: UnscoredWeighting = "groups"
    loader_workers: int = Field(0, ge=0)
    prefetch_batches: int = Field(4, ge=1)
    augment: bool = False
    progress_bar: bool = True

    @field_validator("view_scale")
    @classmethod
    def _crop_fraction(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"view_scale must satisfy 0 < low <= high <= 1, got {value}")
        return value
