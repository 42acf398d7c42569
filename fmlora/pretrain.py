"""Supervised pre-training of a small timm ViT, for offline backbones (no hub download).

The pre-training classes must be disjoint from the benchmark's, as ImageNet-21K is from ImageNet-R.
"""

from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch.nn import functional as F
from tqdm.auto import tqdm

from .backbone import Preprocessor
from .config import BackboneConfig
from .data import ImageSource
from .errors import ConfigError

__all__ = ["pretrain_backbone"]


def pretrain_backbone(
    config: BackboneConfig,
    data: ImageSource,
    out: str | Path,
    *,
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    progress_bar: bool = True,
) -> Path:
    """Train ``config``'s architecture from scratch on ``data`` and write its weights (no classifier).

    Returns the safetensors path, loadable with ``BackboneConfig(weights='file', weights_path=...)``.
    """
    if config.weights != "random":
        raise ConfigError("pre-training starts from random weights: use weights='random'")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = timm.create_model(config.name, pretrained=False, num_classes=len(data.classes), **config.model_kwargs)
    preprocess = Preprocessor.for_model(model, config.data_config_overrides)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )
    model.train()
    for _ in tqdm(range(steps), desc="pretrain", disable=None if progress_bar else True):
        index = torch.randint(0, len(data), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(preprocess(data.fetch(index))), data.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.reset_classifier(0)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return path
