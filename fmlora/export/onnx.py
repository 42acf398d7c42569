"""ONNX export of an FMLoRAModel whose adapter is a set of graph inputs.

The frozen backbone weights are baked into the graph once; everything a snapshot holds (per adapted
matrix the shared basis A and the folded up-projection s·B·C, the meta-prompt bank and its keys, the
task keys and the head) is fed at run time. One exported graph therefore serves every version of a
registry home: a swap is a different feed dictionary, never a re-export.

Graph inputs (names fixed by ``OnnxSpec``):

    images        float32 (N, 3, H, W)   preprocessed as ``model.preprocessor`` does
    prompt_index  int64 (N,)             per image: -1 auto, -2 none, i >= 0 task i's key picks the mix
    <module>.<part>.A / .BC              per adapted matrix: A (r, d_in), s·B·C (d_out, r)
    prompts.bank, prompts.keys, prompts.task_keys (T, D), head.weight (C, D), head.bias (C,)

Outputs: ``logits`` (N, C) and, with meta-prompts, ``query`` (N, D): the [CLS] token entering the first
prompted block (what ``ModelOutput.query`` holds). Without meta-prompts there is no ``prompt_index``
input and no ``query`` output.

The exported forward computes what ``FMLoRAModel.forward_detailed`` computes (same modules, the same
prefix attention with a per-image mask, the same routing), up to float rounding; tests hold the two
within 1e-4.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fmlora.errors import ConfigError, UnknownTaskError
from fmlora.model.layers import AdaptedLinear
from fmlora.model.model import FMLoRAModel
from fmlora.model.prompts import PrefixAttention, PromptChoice

__all__ = ["AUTO", "NONE", "OnnxSpec", "adapter_feeds", "export_onnx", "prompt_indices"]

log = logging.getLogger("fmlora.export.onnx")

AUTO = -1
NONE = -2
IMAGES = "images"
PROMPT_INDEX = "prompt_index"


@dataclass(frozen=True)
class OnnxSpec:
    """What an exported graph expects and returns."""

    path: Path
    input_size: tuple[int, int]
    adapter_inputs: tuple[str, ...]  # in graph order, after images (and prompt_index)
    prompts: bool
    outputs: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(
            {
                "path": str(self.path),
                "input_size": list(self.input_size),
                "adapter_inputs": list(self.adapter_inputs),
                "prompts": self.prompts,
                "outputs": list(self.outputs),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> OnnxSpec:
        data = json.loads(text)
        return cls(
            Path(data["path"]),
            tuple(data["input_size"]),
            tuple(data["adapter_inputs"]),
            bool(data["prompts"]),
            tuple(data["outputs"]),
        )


def _adapter_parts(model: FMLoRAModel) -> list[tuple[str, str]]:
    """(module name, part) of every adapted matrix, in the model's own order."""
    return [(name, part) for name, layer in model.adapted.items() for part in layer.adapters]


def adapter_input_names(model: FMLoRAModel) -> tuple[str, ...]:
    names = []
    for module, part in _adapter_parts(model):
        names += [f"{module}.{part}.A", f"{module}.{part}.BC"]
    if model.prompt_bank is not None:
        names += ["prompts.bank", "prompts.keys", "prompts.task_keys"]
    names += ["head.weight", "head.bias"]
    return tuple(names)


def adapter_feeds(model: FMLoRAModel, tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A snapshot's tensors (``model.adapter_tensors()`` names) → the graph's adapter inputs (float32)."""
    cfg = model.config.adapter
    feeds: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for module, part in _adapter_parts(model):
            prefix = f"adapter.{module}.{part}"
            a = tensors[f"{prefix}.lora_A"].float().cpu()
            b = tensors[f"{prefix}.lora_B"].float().cpu()
            core = tensors[f"{prefix}.core"].float().cpu() if cfg.task_factors else torch.eye(cfg.rank)
            feeds[f"{module}.{part}.A"] = a.contiguous().numpy()
            feeds[f"{module}.{part}.BC"] = ((b @ core) * cfg.scale).contiguous().numpy()
        if model.prompt_bank is not None:
            for name in ("prompts.bank", "prompts.keys", "prompts.task_keys"):
                feeds[name] = tensors[name].float().cpu().contiguous().numpy()
        feeds["head.weight"] = tensors["head.weight"].float().cpu().contiguous().numpy()
        feeds["head.bias"] = tensors["head.bias"].float().cpu().contiguous().numpy()
    return feeds


def prompt_indices(choices: Sequence[PromptChoice | Any], task_names: Sequence[str]) -> np.ndarray:
    """Per-image ``prompt_index`` input: -1 auto, -2 none, i for task i (by ``task_names``)."""
    out = np.empty(len(choices), dtype=np.int64)
    for row, value in enumerate(choices):
        choice = PromptChoice.parse(value)
        if choice.mode == "auto":
            out[row] = AUTO
        elif choice.mode == "none":
            out[row] = NONE
        else:
            try:
                out[row] = list(task_names).index(choice.task or "")
            except ValueError:
                raise UnknownTaskError(f"unknown task {choice.task!r} for prompt selection") from None
    return out


# -- the traceable forward --------------------------------------------------------------------------
class _State:
    """Tensors shared by the replaced modules during one forward (set from the graph inputs)."""

    def __init__(self) -> None:
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.prompt_index: torch.Tensor | None = None
        self.bank: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.task_keys: torch.Tensor | None = None
        self.prefix: torch.Tensor | None = None
        self.query: torch.Tensor | None = None


class _ExportLinear(nn.Module):
    def __init__(self, layer: AdaptedLinear, module_name: str, state: _State) -> None:
        super().__init__()
        self.base = layer.base
        self.parts = sorted(
            ((layer.slices[key][0], layer.slices[key][1], f"{module_name}.{key}") for key in layer.adapters),
        )
        self._state = [state]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._state[0]
        out = self.base(x)
        pieces: list[torch.Tensor] = []
        cursor = 0
        for start, stop, name in self.parts:
            if start > cursor:
                pieces.append(out.new_zeros(*out.shape[:-1], start - cursor))
            a, bc = state.adapters[name]
            pieces.append(F.linear(F.linear(x, a), bc))
            cursor = stop
        if cursor < out.shape[-1]:
            pieces.append(out.new_zeros(*out.shape[:-1], out.shape[-1] - cursor))
        return out + torch.cat(pieces, dim=-1)


class _ExportPrefixAttention(nn.Module):
    """PrefixAttention with the prefix always present and masked off per image (no data-dependent
    branch, so the graph is one for every mix of prompt modes)."""

    def __init__(self, wrapped: PrefixAttention, state: _State) -> None:
        super().__init__()
        self.inner = wrapped.inner
        self.slot = wrapped.slot
        self._state = [state]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        state = self._state[0]
        assert state.prefix is not None and state.prompt_index is not None
        inner = self.inner
        b, n, _ = x.shape
        heads, head_dim = inner.num_heads, inner.head_dim
        gate = inner.gate(x).sigmoid() if getattr(inner, "gate", None) is not None else None
        qkv = inner.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = inner.q_norm(q), inner.k_norm(k)
        prefix = state.prefix[:, self.slot].to(x.dtype)
        length = prefix.shape[2]
        pk = prefix[:, 0].reshape(b, length, heads, head_dim).transpose(1, 2)
        pv = prefix[:, 1].reshape(b, length, heads, head_dim).transpose(1, 2)
        k = torch.cat([pk, k], dim=2)
        v = torch.cat([pv, v], dim=2)
        active = (state.prompt_index != NONE).view(b, 1).expand(b, length)
        mask = torch.cat([active, torch.ones(b, n, dtype=torch.bool, device=x.device)], dim=1).view(b, 1, 1, length + n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, n, heads * head_dim)
        out = inner.norm(out) if hasattr(inner, "norm") else out
        if gate is not None:
            out = out * gate
        return inner.proj_drop(inner.proj(out))


class _Route(nn.Module):
    """Wraps the first prompted block: mixes the bank from the [CLS] query (or a task's key)."""

    def __init__(self, block: nn.Module, state: _State, has_class_token: bool, temperature: float) -> None:
        super().__init__()
        self.block = block
        self._state = [state]
        self.has_class_token = has_class_token
        self.temperature = temperature

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        state = self._state[0]
        assert state.prompt_index is not None and state.task_keys is not None
        assert state.keys is not None and state.bank is not None
        query = x[:, 0] if self.has_class_token else x.mean(dim=1)
        index = state.prompt_index
        named = state.task_keys.to(query.dtype)[index.clamp(min=0)]
        q = torch.where((index >= 0).unsqueeze(1), named, query)
        cos = F.cosine_similarity(q.unsqueeze(1), state.keys.to(q.dtype).unsqueeze(0), dim=-1)
        weights = torch.softmax(cos / self.temperature, dim=-1)
        state.prefix = torch.einsum("bk,knsld->bnsld", weights, state.bank.to(weights.dtype))
        state.query = query
        return self.block(x, *args, **kwargs)


class _Exportable(nn.Module):
    def __init__(self, model: FMLoRAModel) -> None:
        super().__init__()
        if model.task_in_progress:
            raise ConfigError("cannot export while a task is in progress")
        source = copy.deepcopy(model).float().eval()
        source.unmerge()
        state = _State()
        self._state = [state]
        names = {id(layer): name for name, layer in source.adapted.items()}
        backbone = source.backbone
        for block in backbone.blocks:
            block._forward_pre_hooks.clear()
        for parent_name, parent in list(backbone.named_modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, AdaptedLinear):
                    setattr(parent, child_name, _ExportLinear(child, names[id(child)], state))
                elif isinstance(child, PrefixAttention):
                    setattr(parent, child_name, _ExportPrefixAttention(child, state))
            del parent_name
        self.prompts = source.prompt_bank is not None
        # The ridge head's random projection is a constant of the graph (it never changes per version).
        self.head_map = source.head.feature_map if source.head.feature_map is not None else nn.Identity()
        if self.prompts:
            bank = source.prompt_bank
            assert bank is not None
            backbone.blocks[bank.start] = _Route(
                backbone.blocks[bank.start], state, source.has_class_token, bank.config.temperature
            )
        self.backbone = backbone
        self.parts = [f"{module}.{part}" for module, part in _adapter_parts(source)]

    def forward(self, images: torch.Tensor, *inputs: torch.Tensor) -> Any:
        state = self._state[0]
        cursor = 0
        if self.prompts:
            state.prompt_index = inputs[0]
            cursor = 1
        for name in self.parts:
            state.adapters[name] = (inputs[cursor], inputs[cursor + 1])
            cursor += 2
        if self.prompts:
            state.bank, state.keys, state.task_keys = inputs[cursor : cursor + 3]
            cursor += 3
        head_weight, head_bias = inputs[cursor], inputs[cursor + 1]
        tokens = self.backbone.forward_features(images)
        features = self.backbone.forward_head(tokens, pre_logits=True)
        logits = F.linear(self.head_map(features), head_weight, head_bias)
        if self.prompts:
            assert state.query is not None
            return logits, state.query
        return logits


def _example_inputs(model: FMLoRAModel, names: Sequence[str]) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Example tensors (batch 2, 3 classes, 2 tasks) and the dynamic dimension of each input."""
    from torch.export import Dim

    batch, classes, tasks = Dim("batch", min=1, max=4096), Dim("classes", min=1), Dim("tasks", min=1)
    height, width = model.preprocessor.input_size
    g = torch.Generator().manual_seed(0)
    shapes = model.expected_tensor_shapes(num_classes=3, num_tasks=2)
    examples: list[torch.Tensor] = [torch.randn(2, 3, height, width, generator=g)]
    dynamic: list[dict[int, Any] | None] = [{0: batch}]
    if model.prompt_bank is not None:
        examples.append(torch.tensor([AUTO, 1], dtype=torch.long))
        dynamic.append({0: batch})
    cfg = model.config.adapter
    for name in names:
        if name.endswith(".A"):
            module, part = name[:-2].rsplit(".", 1)
            examples.append(torch.randn(shapes[f"adapter.{module}.{part}.lora_A"], generator=g) * 0.02)
            dynamic.append(None)
        elif name.endswith(".BC"):
            module, part = name[:-3].rsplit(".", 1)
            out_features = shapes[f"adapter.{module}.{part}.lora_B"][0]
            examples.append(torch.randn(out_features, cfg.rank, generator=g) * 0.02)
            dynamic.append(None)
        elif name == "prompts.task_keys":
            examples.append(torch.randn(shapes[name], generator=g))
            dynamic.append({0: tasks})
        elif name.startswith("prompts."):
            examples.append(torch.randn(shapes[name], generator=g) * 0.02)
            dynamic.append(None)
        elif name == "head.weight":
            examples.append(torch.randn(shapes[name], generator=g) * 0.02)
            dynamic.append({0: classes})
        else:  # head.bias
            examples.append(torch.zeros(shapes[name]))
            dynamic.append({0: classes})
    return examples, {"images": dynamic[0], "inputs": tuple(dynamic[1:])}


def export_onnx(model: FMLoRAModel, path: str | Path, *, opset: int = 18) -> OnnxSpec:
    """Export ``model``'s architecture and frozen weights to ``path`` with the adapter as inputs.

    The model itself is not modified (a float32 copy is traced). Needs the ``onnx`` and
    ``onnxscript`` packages (torch's exporter); running the graph needs ``onnxruntime``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = adapter_input_names(model)
    wrapper = _Exportable(model).eval()
    examples, dynamic = _example_inputs(model, names)
    input_names = [IMAGES, *([PROMPT_INDEX] if model.prompt_bank is not None else []), *names]
    outputs = ("logits", "query") if model.prompt_bank is not None else ("logits",)
    tmp = path.with_name(f".{path.name}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        # The exporter narrates renamed axes and tracing details; none of it is actionable here.
        warnings.simplefilter("ignore", UserWarning)
        program = torch.onnx.export(
            wrapper,
            tuple(examples),
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=input_names,
            output_names=list(outputs),
            opset_version=opset,
            external_data=False,
            optimize=False,
            verbose=False,
        )
    assert program is not None
    program.save(str(tmp), external_data=False)
    tmp.replace(path)
    return OnnxSpec(path, tuple(model.preprocessor.input_size), names, model.prompt_bank is not None, outputs)
