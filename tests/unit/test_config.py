import pytest

from fmlora.errors import ConfigError
from fmlora.model import AdapterConfig, ModelConfig, PromptConfig, RankSelectorConfig, parse_config
from fmlora.training import TrainConfig, apply_strategy


def test_configs_are_frozen_and_validated():
    config = AdapterConfig()
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        config.rank = 3
    assert config.scale == config.alpha / config.rank
    for bad in ({"rank": 0}, {"targets": ()}, {"targets": ("attn.qkv[x]",)}, {"targets": ("a", "a")}):
        with pytest.raises(ConfigError):
            AdapterConfig(**bad)
    with pytest.raises(ConfigError):
        RankSelectorConfig(candidates=(0.0, 1.5))
    with pytest.raises(ConfigError):
        TrainConfig(unknown_field=1)


def test_parse_config_round_trips_json():
    config = ModelConfig()
    assert parse_config(ModelConfig, config.model_dump(mode="json")) == config
    with pytest.raises(ConfigError):
        parse_config(TrainConfig, {"epochs": -1})


def test_prompt_block_range_fits_the_depth():
    assert PromptConfig().block_range(12) == (1, 6)
    assert PromptConfig().block_range(4) == (1, 2)
    with pytest.raises(ConfigError):
        PromptConfig(start_block=3, end_block=9).block_range(6)


def test_strategies_switch_off_exactly_one_part():
    base = ModelConfig()
    seq = apply_strategy("seq-lora", base)
    assert not seq.adapter.task_factors and seq.adapter.train_bases == "every_task"
    assert not seq.prompts.enabled and not seq.rank_selector.enabled
    assert not apply_strategy("fmlora-no-drs", base).rank_selector.enabled
    assert apply_strategy("fmlora-no-drs", base).prompts == base.prompts
    assert not apply_strategy("fmlora-no-dmp", base).prompts.enabled
    with pytest.raises(ConfigError, match="unknown strategy"):
        apply_strategy("magic", base)
