"""Small utilities shared by tests."""

from __future__ import annotations

import torch

from fmlora.model import FMLoRAModel


def learn_quickly(model: FMLoRAModel, name: str, classes: list[str], seed: int = 0, kind: str = "class") -> None:
    """Run a task's life cycle without training: random factors and head rows stand in for learning."""
    g = torch.Generator().manual_seed(seed)
    model.begin_task(name, kind, classes, complexity=0.5, novelty=0.5, generator=g)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.end_task(torch.randn(model.embed_dim, generator=g), torch.randn(model.embed_dim, generator=g))


def preprocess(model: FMLoRAModel, images: torch.Tensor) -> torch.Tensor:
    return model.preprocessor(images)
