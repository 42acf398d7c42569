"""The framework-free serving core: the engine, its backends (torch, ONNX Runtime) behind one typed
interface, the micro-batcher, the version cache, the version source (registry watcher) and image
decoding. ``protocol.ServingEngine`` is the seam a host (the HTTP layer) holds the engine by.

Never imports ``server.api`` or any web framework (an import-linter contract enforces it).
"""

from server.core.config import EngineConfig
from server.core.engine import Engine
from server.core.protocol import EngineInfo, EngineStats, PromptInput, ServedVersion, ServingEngine
from server.core.results import ImageResult, Prediction

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineInfo",
    "EngineStats",
    "ImageResult",
    "Prediction",
    "PromptInput",
    "ServedVersion",
    "ServingEngine",
]
