"""Supervised pre-training of a small timm ViT, for offline backbones (no hub download).

The pre-training classes must be disjoint from the benchmark's, as ImageNet-21K is from ImageNet-R.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch.nn import functional as F
from tqdm.auto import tqdm

from fmlora.data.images import ImageSource, batches
from fmlora.errors import ConfigError
from fmlora.model.backbone import Preprocessor
from fmlora.model.config import BackboneConfig

__all__ = ["BatchSampler", "linear_probe", "pretrain_backbone"]

# Draws a fresh (uint8 images, labels) batch of the given size: on-the-fly augmentation.
BatchSampler = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))


def pretrain_backbone(
    config: BackboneConfig,
    data: ImageSource | BatchSampler,
    out: str | Path,
    *,
    num_classes: int | None = None,
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
    progress_bar: bool = True,
    held_out: ImageSource | None = None,
    metadata: dict[str, str] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    half_precision: bool = False,
) -> dict[str, Any]:
    """Train ``config``'s architecture from scratch and write its weights (no classifier) to ``out``.

    ``data`` is a fixed image source or a sampler that renders fresh batches. Returns a report with
    the final loss and, when ``held_out`` is given, its top-1 accuracy. The file loads with
    ``BackboneConfig(weights='file', weights_path=out)``.
    """
    if config.weights != "random":
        raise ConfigError("pre-training starts from random weights: use weights='random'")
    if callable(data) and not hasattr(data, "fetch") and num_classes is None:
        raise ConfigError("a batch sampler needs num_classes")
    classes = num_classes if num_classes is not None else len(data.classes)  # type: ignore[union-attr]
    torch.manual_seed(seed)  # timm's initialisation draws from the global generator
    generator = torch.Generator().manual_seed(seed)
    model = timm.create_model(config.name, pretrained=False, num_classes=classes, **config.model_kwargs)
    preprocess = Preprocessor.for_model(model, config.data_config_overrides, config.input_norm)
    groups = [
        {"params": [p for n, p in model.named_parameters() if not _no_decay(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if _no_decay(n, p)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    autocast = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    model.train()
    loss_value = float("nan")
    bar = tqdm(range(steps), desc="pretrain", disable=None if progress_bar else True)
    for step in bar:
        if hasattr(data, "fetch"):
            index = torch.randint(0, len(data), (batch_size,), generator=generator)  # type: ignore[arg-type]
            images, labels = data.fetch(index), data.labels[index]  # type: ignore[union-attr]
        else:
            images, labels = data(batch_size)  # type: ignore[operator]
        with autocast:
            logits = model(preprocess(images))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if on_step is not None:
            on_step(step + 1, loss_value)
    model.eval()
    report: dict[str, Any] = {"steps": steps, "final_loss": loss_value, "num_classes": classes}
    if held_out is not None:
        correct = 0
        with torch.no_grad():
            for images, labels in batches(held_out, 256):
                correct += int((model(preprocess(images)).argmax(-1) == labels).sum())
        report["held_out_accuracy"] = correct / len(held_out)
    model.reset_classifier(0)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # float16 halves the shipped file; loading casts back to the model's float32 parameters.
    dtype = torch.float16 if half_precision else None
    state = {k: v.to(dtype).contiguous() if dtype else v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)
    report["path"] = str(path)
    return report


@torch.no_grad()
def _features(backbone: torch.nn.Module, preprocess: Preprocessor, data: ImageSource) -> torch.Tensor:
    out = [
        backbone.forward_head(backbone.forward_features(preprocess(x)), pre_logits=True) for x, _ in batches(data, 256)
    ]
    return torch.cat(out)


def linear_probe(config: BackboneConfig, train: ImageSource, test: ImageSource, steps: int = 300) -> float:
    """Top-1 accuracy of a linear classifier on the frozen backbone's features (a measure of the
    backbone, not of any continual-learning method)."""
    from fmlora.model.backbone import create_backbone

    backbone = create_backbone(config)
    preprocess = Preprocessor.for_model(backbone, config.data_config_overrides, config.input_norm)
    x_train, x_test = _features(backbone, preprocess, train), _features(backbone, preprocess, test)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    head = torch.nn.Linear(x_train.shape[1], len(train.classes))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(head(x_train), train.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    position = {c: i for i, c in enumerate(train.classes)}
    targets = torch.tensor([position[test.classes[i]] for i in test.labels.tolist()])
    return float((head(x_test).argmax(-1) == targets).float().mean())
