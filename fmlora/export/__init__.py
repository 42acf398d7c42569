"""ONNX export of an adapted model (adapter tensors as graph inputs, one graph for every version).

May import ``fmlora.model``.
"""

from .onnx import AUTO, NONE, OnnxSpec, adapter_feeds, export_onnx, prompt_indices

__all__ = ["AUTO", "NONE", "OnnxSpec", "adapter_feeds", "export_onnx", "prompt_indices"]
