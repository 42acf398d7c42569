"""The torch backend: the resident FMLoRAModel on its device and dtype, and a shadow of it.

Versions are switched by reference, never by copying. ``prepare`` (in the loading thread) wraps a
version's staged tensors and binds them into the *shadow*: a second FMLoRAModel whose modules are
its own but whose frozen weights are the resident model's very tensors (no second copy of the
backbone). There the merged weights W0 + ΔW of the version are computed (ΔW by fmlora's own
``AdaptedLinear.get_delta_weight``) and a probe batch checks the outputs, all while the inference
thread keeps serving. ``activate`` (in the inference thread, between two batches) then binds the
same tensors into the resident model: a few attribute assignments per adapted matrix, no
arithmetic. Nothing writes into a tensor while a model binds it or a version holds it, so versions,
the shadow and the resident model share them safely.

Merged adapters (the default) cost what the bare layer costs per forward; the unmerged low-rank
path measured 10-20 % slower at batch 8-32 on CPU. A prepared version keeps its merged weights (one
copy of every adapted matrix) for as long as the version cache keeps it.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from fmlora.model.layers import AdaptedLinear
from fmlora.model.model import FMLoRAModel, TaskRecord
from fmlora.model.prompts import PromptChoice
from fmlora.model.snapshot import Snapshot, check_compatible
from server.core.backends.protocol import BackendInfo, probe_images, run_probe
from server.core.errors import InferenceError
from server.core.versions import PreparedVersion, VersionEntry

__all__ = ["TorchBackend"]


@dataclass(frozen=True)
class _Prepared(PreparedVersion):
    """A version's state as the models hold it: tensors by snapshot name, merged weights by layer."""

    tensors: dict[str, torch.Tensor]
    merged: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    label_tasks: tuple[str, ...] = ()
    tasks: tuple[TaskRecord, ...] = ()


@dataclass(frozen=True)
class _Slot:
    module: nn.Module
    attr: str
    parameter: bool


class _Slots:
    """Where one model keeps each piece of a version's state (attribute assignment binds it)."""

    def __init__(self, model: FMLoRAModel) -> None:
        self.model = model
        places: dict[str, tuple[nn.Module, str]] = {}
        for module_name, layer in model.adapted.items():
            for part, adapter in layer.adapters.items():
                for attr in ("lora_A", "lora_B", "core"):
                    places[f"adapter.{module_name}.{part}.{attr}"] = (adapter, attr)
        bank = model.prompt_bank
        if bank is not None:
            places.update({"prompts.bank": (bank, "prompts"), "prompts.keys": (bank, "keys")})
            places["prompts.task_keys"] = (bank, "task_keys")
        places["tasks.feature_means"] = (model, "task_feature_means")
        places["head.weight"] = (model.head, "frozen_weight")
        places["head.bias"] = (model.head, "frozen_bias")
        expected = set(model.expected_tensor_shapes(num_classes=0, num_tasks=0))
        if set(places) != expected:  # fmlora's snapshot layout changed: refuse to start, never mis-bind
            raise InferenceError(f"the torch backend cannot bind the snapshot tensors {sorted(expected ^ set(places))}")
        self.tensors = {
            key: _Slot(module, attr, isinstance(getattr(module, attr), nn.Parameter))
            for key, (module, attr) in places.items()
        }

    def bind(self, state: _Prepared, *, merged: bool) -> None:
        for key, slot in self.tensors.items():
            setattr(slot.module, slot.attr, state.tensors[key])
        if merged:
            for name, layer in self.model.adapted.items():
                layer.merged_weight = state.merged[name]
        model = self.model
        model.head.labels = list(state.labels)
        model.head.label_tasks = list(state.label_tasks)
        if model.prompt_bank is not None:
            model.prompt_bank.task_names = [t.name for t in state.tasks]
        model.tasks = list(state.tasks)


class _MergedStorage:
    """One block per prepared version holding all its merged weights, reused: a block comes back when
    its version's prepared state is released (evicted from the cache and bound by no model). Once the
    cache is full a swap allocates nothing large, so the memory allocator does not fragment (blocks
    of a few versions' lifetimes freed among short-lived ones kept ~20 MB of heap in a 1,000-swap soak)."""

    def __init__(self, layers: dict[str, AdaptedLinear]) -> None:
        weights = {name: layer.base.weight for name, layer in layers.items()}
        self._shapes = {name: w.shape for name, w in weights.items()}
        self._sizes = [w.numel() for w in weights.values()]
        first = next(iter(weights.values()))
        self._like = {"device": first.device, "dtype": first.dtype}
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.allocated = 0  # blocks ever allocated: the most versions prepared and alive at once

    def take(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self._lock:
            block = self._free.pop() if self._free else None
            if block is None:
                self.allocated += 1
        if block is None:
            block = torch.empty(sum(self._sizes), **self._like)
        parts = block.split(self._sizes)
        return block, {name: part.view(shape) for part, (name, shape) in zip(parts, self._shapes.items(), strict=True)}

    def give(self, block: torch.Tensor) -> None:
        with self._lock:
            self._free.append(block)


def _shadow_of(model: FMLoRAModel) -> FMLoRAModel:
    """A copy of ``model`` with modules of its own that shares every parameter and buffer tensor."""
    memo: dict[int, object] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class TorchBackend:
    name = "torch"

    def __init__(self, model: FMLoRAModel, device: torch.device, dtype: torch.dtype, merge: bool) -> None:
        self.model = model.eval().to(device=device, dtype=dtype)
        self.device = device
        self.dtype = dtype
        self.input_size: tuple[int, int] = tuple(model.preprocessor.input_size)  # type: ignore[assignment]
        self.merge = merge
        if merge:
            self.model.merge()
        pre = model.preprocessor
        # The data config's mean/std on the device, so normalisation runs where the model does.
        self._mean = torch.tensor(pre.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self._std = torch.tensor(pre.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self._slots = _Slots(self.model)
        self._shadow = _shadow_of(self.model)
        self._shadow_slots = _Slots(self._shadow)
        self._prepare_lock = threading.Lock()  # one shadow: one version prepared at a time
        self._storage = _MergedStorage(self.model.adapted)
        self.loaded: VersionEntry | None = None
        self.switches_total = 0
        self.last_switch_seconds: float | None = None

    def describe(self) -> BackendInfo:
        return BackendInfo(backend=self.name, device=str(self.device), dtype=str(self.dtype).removeprefix("torch."))

    # -- versions (any thread) ---------------------------------------------------------------
    def check(self, snapshot: Snapshot) -> None:
        check_compatible(snapshot, self.model)

    def stage(self, snapshot: Snapshot) -> dict[str, torch.Tensor]:
        return {k: v.to(device=self.device, dtype=self.dtype) for k, v in snapshot.tensors.items()}

    def prepare(self, entry: VersionEntry) -> _Prepared:
        tensors = {
            key: nn.Parameter(entry.tensors[key], requires_grad=False) if slot.parameter else entry.tensors[key]
            for key, slot in self._slots.tensors.items()
        }
        state = _Prepared(tensors, {}, tuple(entry.labels), tuple(entry.label_tasks), tuple(entry.tasks))
        with self._prepare_lock:
            self._shadow_slots.bind(state, merged=False)
            if self.merge:
                block, merged = self._storage.take()
                state = replace(state, merged=merged)
                weakref.finalize(state, self._storage.give, block)
                with torch.no_grad():  # AdaptedLinear.merge(), into the block: W0 + ΔW of this version
                    for name, layer in self._shadow.adapted.items():
                        torch.add(layer.base.weight, layer.get_delta_weight(), out=merged[name])
                self._shadow_slots.bind(state, merged=True)
            run_probe(entry, self.input_size, lambda images, choices: self._run(self._shadow, images, choices)[0])
        return state

    # -- inference thread --------------------------------------------------------------------
    def activate(self, entry: VersionEntry) -> None:
        if self.loaded is entry:
            return
        state = entry.prepared
        if not isinstance(state, _Prepared):
            raise InferenceError(f"version {entry.version} was not prepared by the torch backend")
        started = time.perf_counter()
        self._slots.bind(state, merged=self.merge)
        self.loaded = entry
        self.switches_total += 1
        self.last_switch_seconds = time.perf_counter() - started

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) at the input size → the model's float input, on the device.

        Equal to ``model.preprocessor`` (tested) but with the constants already on the device."""
        pre = self.model.preprocessor
        if pre.input_norm == "timm":
            return (images.float().div_(255.0) - self._mean) / self._std
        return pre(images)  # per-image standardisation: no constant tensors, runs on any device

    def forward(self, images: np.ndarray, choices: list[PromptChoice]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._run(self.model, images, choices)

    def _run(
        self, model: FMLoRAModel, images: np.ndarray, choices: list[PromptChoice]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = torch.from_numpy(images).to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            out = model.forward_detailed(self.normalize(x), choices)
        return out.logits, out.query

    def warm_bare(self, batch_sizes: Sequence[int]) -> None:
        for n in batch_sizes:
            images = probe_images(n, self.input_size)
            x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).contiguous()
            with torch.inference_mode():
                features = self.model.backbone_features(self.normalize(x).to(self.dtype))
            if not bool(torch.isfinite(features).all()):
                raise InferenceError("the backbone produces non-finite features")

    def close(self) -> None:
        pass
