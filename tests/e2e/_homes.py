"""Registry homes with tiny real snapshots, for tests that run the real engine."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from fmlora.model import BackboneConfig, FMLoRAModel, ModelConfig
from fmlora.registry.publish import publish_version
from fmlora.registry.registry import Registry
from tests.conftest import TINY_KWARGS, TINY_RANDOM, tiny_config
from tests.helpers import learn_quickly


def tiny_file_config(directory: Path) -> ModelConfig:
    """The tiny ViT with its random weights saved to a file: every process that builds the model
    (the test, the server, a worker) gets the same backbone, so snapshots are compatible."""
    path = directory / "tiny-backbone.safetensors"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(1234)
        backbone = timm.create_model(TINY_RANDOM.name, pretrained=False, num_classes=0, **TINY_KWARGS)
        save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    return tiny_config(
        BackboneConfig(name=TINY_RANDOM.name, weights="file", weights_path=path, model_kwargs=dict(TINY_KWARGS))
    )


def publish_tiny_version(registry: Registry, model: FMLoRAModel, task_name: str) -> int:
    """Save ``model``'s adapter as the next version and make it live (what the worker does)."""
    names = [t.name for t in model.tasks]
    card = {
        "task": task_name,
        "tasks": names,
        "accuracy": {name: 0.5 + 0.1 * i for i, name in enumerate(names)},
        "final_accuracy": 0.75,
        "average_incremental_accuracy": 0.8,
        "forgetting": 0.02,
    }
    return publish_version(registry, model, card=card, parent=registry.live_version()).version


def tiny_home(home: Path, tasks: dict[str, list[str]] | None = None) -> tuple[Registry, FMLoRAModel]:
    """A home on the tiny random ViT with one published version per task (in order)."""
    config = tiny_file_config(home.parent / "backbone")
    torch.manual_seed(0)
    registry = Registry.open(home, config)
    model = FMLoRAModel(config)
    for seed, (name, classes) in enumerate((tasks or {}).items()):
        learn_quickly(model, name, classes, seed=seed)
        publish_tiny_version(registry, model, name)
    return registry, model
