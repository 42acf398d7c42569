"""Continual-learning strategies as named transformations of a ModelConfig.

Each baseline is the same model with one of FM-LoRA's parts switched off, so a comparison measures
exactly that part.
"""

from __future__ import annotations

from collections.abc import Callable

from fmlora.errors import ConfigError
from fmlora.model.config import ModelConfig

__all__ = ["STRATEGIES", "apply_strategy"]


def _fmlora(config: ModelConfig) -> ModelConfig:
    return config


def _sequential_lora(config: ModelConfig) -> ModelConfig:
    """Plain LoRA (B A) fine-tuned task after task: the lower bound."""
    return config.model_copy(
        update={
            "adapter": config.adapter.model_copy(update={"train_bases": "every_task", "task_factors": False}),
            "rank_selector": config.rank_selector.model_copy(update={"enabled": False}),
            "prompts": config.prompts.model_copy(update={"enabled": False}),
        }
    )


def _without_drs(config: ModelConfig) -> ModelConfig:
    return config.model_copy(update={"rank_selector": config.rank_selector.model_copy(update={"enabled": False})})


def _without_dmp(config: ModelConfig) -> ModelConfig:
    return config.model_copy(update={"prompts": config.prompts.model_copy(update={"enabled": False})})


STRATEGIES: dict[str, Callable[[ModelConfig], ModelConfig]] = {
    "fmlora": _fmlora,
    "seq-lora": _sequential_lora,
    "fmlora-no-drs": _without_drs,
    "fmlora-no-dmp": _without_dmp,
}


def apply_strategy(name: str, config: ModelConfig) -> ModelConfig:
    try:
        return STRATEGIES[name](config)
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}") from None
