"""The framework-free serving core: the engine, its backends (torch, ONNX Runtime), the micro-batcher,
the version cache, the registry watcher and image decoding.

Never imports ``server.api`` or any web framework (an import-linter contract enforces it).
"""
