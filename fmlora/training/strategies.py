"""Continual-learning strategies as named transformations of a ModelConfig.

Each baseline is the same model with one of FM-LoRA's parts switched off, so a comparison measures
exactly that part.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fmlora.errors import ConfigError
from fmlora.model.config import ModelConfig

from .config import TrainConfig

__all__ = ["STRATEGIES", "TRAINING", "apply_strategy", "apply_training_strategy"]


def _fmlora(config: ModelConfig) -> ModelConfig:
    return config


def _sequential_lora(config: ModelConfig) -> ModelConfig:
    """Plain LoRA (B A) fine-tuned task after task: the lower bound."""
    return config.model_copy(
        update={
            "adapter": config.adapter.model_copy(update={"train_bases": "every_task", "task_factors": False}),
            "rank_selector": config.rank_selector.model_copy(update={"enabled": False}),
            "prompts": config.prompts.model_copy(update={"enabled": False}),
            "head": config.head.model_copy(update={"kind": "linear"}),
        }
    )


def _without_drs(config: ModelConfig) -> ModelConfig:
    return config.model_copy(update={"rank_selector": config.rank_selector.model_copy(update={"enabled": False})})


def _without_dmp(config: ModelConfig) -> ModelConfig:
    return config.model_copy(update={"prompts": config.prompts.model_copy(update={"enabled": False})})


def _linear_head(config: ModelConfig) -> ModelConfig:
    """The first design's head: linear rows trained task by task, earlier classes masked."""
    return config.model_copy(update={"head": config.head.model_copy(update={"kind": "linear"})})


def _ridge_head(config: ModelConfig) -> ModelConfig:
    return config.model_copy(update={"head": config.head.model_copy(update={"kind": "ridge"})})


STRATEGIES: dict[str, Callable[[ModelConfig], ModelConfig]] = {
    "fmlora": _fmlora,
    "seq-lora": _sequential_lora,
    "fmlora-no-drs": _without_drs,
    "fmlora-no-dmp": _without_dmp,
    "fmlora-continual": _ridge_head,
    "fmlora-on-demand": _ridge_head,
    "fmlora-first-task": _ridge_head,
    "fmlora-frozen": _ridge_head,
    "fmlora-no-drift": _ridge_head,
    "fmlora-lambda-tally": _ridge_head,
    "fmlora-lambda-task": _ridge_head,
    "fmlora-lambda-se": _ridge_head,
    "fmlora-lambda-smooth": _ridge_head,
    "fmlora-lambda-held-out": _ridge_head,
    "fmlora-views": _ridge_head,
    "fmlora-views-unweighted": _ridge_head,
    "fmlora-linear": _linear_head,
}

# Strategies that differ in how they train rather than in the model.
TRAINING: dict[str, dict[str, Any]] = {
    "fmlora-continual": {"adaptation": "continual"},  # adapt on every task, whatever the default
    # adapt on the first task and on later tasks the features separate badly (novel) only
    "fmlora-on-demand": {"adaptation": "on_demand"},
    "fmlora-first-task": {"adaptation": "first_task"},  # adapt on the first task only (RanPAC's recipe)
    "fmlora-frozen": {"adaptation": "none"},  # never adapt: the solved head on the frozen backbone
    # adapt on every task but keep earlier classes' statistics as taken (no drift compensation)
    "fmlora-no-drift": {"adaptation": "continual", "drift_compensation": "none"},
    # λ of the ridge head from held-out hits tallied over tasks instead of each task's fifth alone
    "fmlora-lambda-tally": {"adaptation": "continual", "lambda_selection": "cumulative", "lambda_scoring": "held_out"},
    # λ chosen on each task's leave-one-out hits alone (the default until the tally, 2026-12-03)
    "fmlora-lambda-task": {"lambda_selection": "task"},
    # λ scored on a held-out fifth of the task, per task (RanPAC's recipe; the default before leave-one-out)
    "fmlora-lambda-held-out": {"lambda_selection": "task", "lambda_scoring": "held_out"},
    # that, with λ the largest within half a standard error of the best held-out count
    "fmlora-lambda-se": {"lambda_selection": "task", "lambda_scoring": "held_out", "lambda_tolerance": 0.5},
    # that, with each candidate's held-out hits averaged with its neighbours' before the arg-max
    "fmlora-lambda-smooth": {"lambda_selection": "task", "lambda_scoring": "held_out", "lambda_smoothing": 1},
    # two random resized crops of every training image join the head's class statistics (after λ)
    "fmlora-views": {"statistics_views": 2},
    # the same, λ scored with each image counted once (its views left out of the weighting)
    "fmlora-views-unweighted": {"statistics_views": 2, "view_weighting": "none"},
}


def apply_training_strategy(name: str, config: TrainConfig) -> TrainConfig:
    return config.model_copy(update=TRAINING.get(name, {}))


def apply_strategy(name: str, config: ModelConfig) -> ModelConfig:
    try:
        return STRATEGIES[name](config)
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}") from None
