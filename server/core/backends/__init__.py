"""Inference backends behind one typed interface (``Backend``): torch (default) and ONNX Runtime."""

from __future__ import annotations

import torch

from fmlora.model.model import FMLoRAModel
from server.core.backends.protocol import Backend, BackendInfo
from server.core.config import EngineConfig

__all__ = ["Backend", "BackendInfo", "make_backend"]


def make_backend(config: EngineConfig, model: FMLoRAModel, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend ``config`` names, holding ``model`` (imported lazily: ONNX Runtime is optional)."""
    if config.backend == "onnx":
        from server.core.backends.onnx import OnnxBackend

        return OnnxBackend(model, cache_dir=config.onnx_dir)
    from server.core.backends.torch import TorchBackend

    return TorchBackend(model, device, dtype, config.merge_adapters)
