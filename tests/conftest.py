"""Shared fixtures: tiny ViTs that build in milliseconds, and a small pre-trained one for learning tests."""

from __future__ import annotations

import os

# Tests never reach a model hub; a missing hub weight then fails fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from pathlib import Path

import pytest
import torch

from fmlora.data import make_synthetic_stream
from fmlora.model import AdapterConfig, BackboneConfig, FMLoRAModel, HeadConfig, ModelConfig, PromptConfig
from fmlora.training.pretrain import pretrain_backbone

TINY_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}
TINY_RANDOM = BackboneConfig(name="vit_tiny_patch16_224", weights="random", model_kwargs=TINY_KWARGS)
# The tiny ViT's 64 features need no 4,000-feature head, and at that size every task a test learns
# spends seconds on the ridge's λ search; tests of the head's own size set it explicitly.
TINY_HEAD = HeadConfig(random_features=512)


def tiny_config(backbone: BackboneConfig = TINY_RANDOM, **overrides: object) -> ModelConfig:
    fields = {
        "backbone": backbone,
        "adapter": AdapterConfig(rank=8, alpha=8),
        "prompts": PromptConfig(bank_size=4, length=4),
        "head": TINY_HEAD,
    }
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.fixture
def tiny_model() -> FMLoRAModel:
    torch.manual_seed(0)
    return FMLoRAModel(tiny_config())


@pytest.fixture(scope="session")
def pretrained_tiny(tmp_path_factory: pytest.TempPathFactory) -> BackboneConfig:
    """A tiny ViT pre-trained on synthetic classes disjoint from the test streams' (seeded)."""
    data = make_synthetic_stream(num_tasks=1, classes_per_task=32, train_per_class=32, test_per_class=1, seed=123)
    path = tmp_path_factory.mktemp("backbone") / "tiny.safetensors"
    pretrain_backbone(TINY_RANDOM, data[0].train, path, steps=150, seed=0, progress_bar=False)
    return TINY_RANDOM.model_copy(update={"weights": "file", "weights_path": Path(path)})


def random_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
