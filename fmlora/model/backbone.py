"""The frozen timm Vision Transformer: creation, offline weights, fingerprint and preprocessing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch import nn

from fmlora.errors import BackboneError, DataError, WeightsNotFoundError

from .config import OFFLINE_WEIGHTS, BackboneConfig

__all__ = ["OFFLINE_BACKBONE", "OFFLINE_WEIGHTS", "Preprocessor", "create_backbone", "weights_fingerprint"]

# The shipped offline backbone (BackboneConfig's defaults); see fmlora/assets/*.json for its training.
OFFLINE_BACKBONE = BackboneConfig.offline()

_LOCAL_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def create_backbone(config: BackboneConfig) -> nn.Module:
    """Create the timm ViT named in ``config`` without its classifier, frozen and in eval mode."""
    kwargs: dict[str, Any] = {"num_classes": 0, **config.model_kwargs}
    try:
        if config.weights == "random":
            model = timm.create_model(config.name, pretrained=False, **kwargs)
        elif config.weights == "pretrained":
            model = timm.create_model(config.name, pretrained=True, **kwargs)
        else:
            model = _create_from_file(config.name, Path(config.weights_path), kwargs)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        if isinstance(exc, WeightsNotFoundError):
            raise
        raise BackboneError(f"cannot create backbone {config.name!r} ({config.weights}): {exc}") from exc
    if not hasattr(model, "blocks") or not hasattr(model, "forward_features"):
        raise BackboneError(f"{config.name!r} is not a Vision Transformer with a 'blocks' sequence")
    model.requires_grad_(False)
    return model.eval()


def _create_from_file(name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    if not path.is_file():
        raise WeightsNotFoundError(f"backbone weight file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in _LOCAL_WEIGHT_SUFFIXES:
        raise WeightsNotFoundError(
            f"unsupported weight file {path.name!r}; expected one of {', '.join(_LOCAL_WEIGHT_SUFFIXES)}"
        )
    # timm's pretrained path applies its checkpoint filter (pos-embed resizing, head removal);
    # .pth files go through torch.load(weights_only=True) there, .npz through the model's JAX loader.
    overlay: dict[str, Any] = {"file": str(path)}
    if suffix == ".npz":
        overlay["custom_load"] = True
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the backbone's tensors (names, dtypes, shapes, bytes) in a fixed order.

    Snapshots record it so an adapter is never applied to weights it was not trained on.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class Preprocessor:
    """Turns images into the backbone's input, from timm's data config (never hand-typed constants)."""

    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    data_config: dict[str, Any]
    input_norm: str = "timm"

    @classmethod
    def for_model(
        cls, model: nn.Module, overrides: dict[str, Any] | None = None, input_norm: str = "timm"
    ) -> Preprocessor:
        args = dict(overrides or {})
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None and "input_size" not in args:
            # pretrained_cfg keeps the default resolution when img_size is overridden at creation.
            args["input_size"] = (3, *img_size)
        cfg = resolve_data_config(args, model=model)
        _, height, width = cfg["input_size"]
        return cls((height, width), tuple(cfg["mean"]), tuple(cfg["std"]), cfg, input_norm)

    @property
    def crop_pct(self) -> float:
        """The data config's centre-crop fraction, capped at 1 (training and serving both crop by it)."""
        return min(1.0, float(self.data_config.get("crop_pct", 1.0) or 1.0))

    def pil_transform(self) -> Any:
        """timm's eval transform (resize, centre crop, normalise) for PIL images."""
        return create_transform(**self.data_config, is_training=False)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise a uint8 (N, 3, H, W) batch, resizing to the model's input size if needed."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"expected uint8 images of shape (N, 3, H, W), got {images.dtype} {images.shape}")
        x = images.float().div_(255.0)
        if tuple(x.shape[-2:]) != self.input_size:
            x = nn.functional.interpolate(x, size=self.input_size, mode="bilinear", antialias=True)
        if self.input_norm == "per-image":
            return _standardize_per_image(x)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def _standardize_per_image(x: torch.Tensor) -> torch.Tensor:
    """Grey level minus the image's median (its background), over its std, sign so strokes are positive."""
    grey = x.mean(dim=1, keepdim=True)
    flat = grey.flatten(1)
    centred = grey - flat.median(dim=1).values.view(-1, 1, 1, 1)
    scaled = centred / centred.flatten(1).std(dim=1).clamp_min(1e-3).view(-1, 1, 1, 1)
    # The background is the majority at the median; strokes are the skewed tail.
    sign = torch.where(scaled.flatten(1).mean(dim=1) < 0, -1.0, 1.0).view(-1, 1, 1, 1)
    return (scaled * sign).expand(-1, 3, -1, -1).contiguous()
