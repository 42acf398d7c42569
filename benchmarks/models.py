"""The models a benchmark runs on: ``offline`` (the shipped glyph ViT), ``tiny`` (the tests' 32-px ViT)
or any timm name, always built from weights on disk so that every process (the benchmark, the server,
a worker) builds the same backbone and the snapshots one publishes, another can load."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["TINY_KWARGS", "backbone_config", "model_config"]

TINY_KWARGS: dict[str, Any] = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}


def backbone_config(name: str, weights_dir: str | Path | None = None, *, weights: str = "random") -> Any:
    """A BackboneConfig for ``name``.

    ``offline``: the shipped glyph ViT (``ModelConfig()``'s default). ``tiny``: the tests' 32-px ViT.
    Any timm name: ``weights="random"`` (default) writes timm's seeded random initialisation to
    ``weights_dir/<name>.safetensors`` once and loads it from there, so every process (this one, the
    server, a worker) builds the same backbone and snapshots stay compatible; ``weights="pretrained"``
    uses timm's pretrained weights (from the local cache when HF_HUB_OFFLINE is set).
    """
    from fmlora.model import BackboneConfig

    if name == "offline":
        return BackboneConfig.offline()
    kwargs = dict(TINY_KWARGS) if name == "tiny" else {}
    timm_name = "vit_tiny_patch16_224" if name == "tiny" else name
    if weights == "pretrained":
        return BackboneConfig(name=timm_name, weights="pretrained", model_kwargs=kwargs)
    if weights != "random":
        raise ValueError(f"weights must be 'random' or 'pretrained', got {weights!r}")
    directory = Path(weights_dir) if weights_dir is not None else Path(tempfile.gettempdir()) / "fmlora-bench-weights"
    path = directory / f"{name.replace('/', '_')}-seed1234.safetensors"
    if not path.exists():
        import timm
        import torch
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(1234)
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(path)
    return BackboneConfig(name=timm_name, weights="file", weights_path=path, model_kwargs=kwargs)


def model_config(name: str, weights_dir: str | Path | None = None, *, weights: str = "random") -> Any:
    """ModelConfig for ``name`` (see ``backbone_config``); default adapter, prompt and head settings,
    except the tiny ViT, which uses the tests' small adapter, prompt bank and head (its 64 features
    need no 4,000 random features, whose λ search costs seconds per task)."""
    from fmlora.model import AdapterConfig, HeadConfig, ModelConfig, PromptConfig

    if name == "offline":
        return ModelConfig()
    backbone = backbone_config(name, weights_dir, weights=weights)
    if name == "tiny":
        return ModelConfig(
            backbone=backbone,
            adapter=AdapterConfig(rank=8, alpha=8),
            prompts=PromptConfig(bank_size=4, length=4),
            head=HeadConfig(random_features=512),
        )
    return ModelConfig(backbone=backbone)
