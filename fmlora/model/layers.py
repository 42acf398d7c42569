"""F-LoRA: low-rank updates in one shared subspace with per-task r x r factors (ARCHITECTURE.md §2).

    y = W0 x + s * B (C + M_t diag(g_t) N_t) A x

A (r x d_in) and B (d_out x r) are shared bases, C the folded core of all earlier tasks, M_t and N_t
this task's factors and g_t the rank gate chosen by the rank selector. The frozen W0 is never
modified: merging builds a separate weight, so unmerging is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from fmlora.errors import AdapterStateError, InjectionError

from ._threadlocal import PerThread
from .config import QKV_PARTS, AdapterConfig

__all__ = ["AdaptedLinear", "AdapterRuntime", "FLoRAAdapter", "inject_adapters", "parse_target"]


class AdapterRuntime(PerThread):
    """Switches shared by every adapter of one model, private to each thread.

    ``gate``: the current task's rank gate (None: all ranks on). ``bare``: adapters off, so one thread
    can measure the frozen backbone while another serves.
    """

    @property
    def gate(self) -> torch.Tensor | None:
        return self.get("gate")

    @gate.setter
    def gate(self, value: torch.Tensor | None) -> None:
        self.set("gate", value)

    @property
    def bare(self) -> bool:
        return bool(self.get("bare", False))

    @bare.setter
    def bare(self, value: bool) -> None:
        self.set("bare", value)


class FLoRAAdapter(nn.Module):
    """The low-rank path of one weight matrix (or one q/k/v slice of a fused qkv matrix)."""

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig, runtime: AdapterRuntime):
        super().__init__()
        r = config.rank
        self.rank = r
        self.scale = config.scale
        self.task_factors_enabled = config.task_factors
        self.factor_init_scale = config.factor_init_scale
        self.lora_A = nn.Parameter(torch.zeros(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_buffer("core", torch.zeros(r, r))
        self.factor_M: nn.Parameter | None = None
        self.factor_N: nn.Parameter | None = None
        # Plain attribute: every adapter of a model shares one runtime object.
        self._runtime = runtime

    @property
    def has_task(self) -> bool:
        return self.factor_M is not None

    def begin_task(self, first: bool, generator: torch.Generator | None = None) -> None:
        """Create this task's factors so that the update starts where the last task ended."""
        if not self.task_factors_enabled:
            return
        r, like = self.rank, {"device": self.core.device, "dtype": self.core.dtype}
        if first:
            # B = 0 keeps the model unchanged; M = N = I keeps gradients flowing into A and B.
            m = torch.eye(r, **like)
            n = torch.eye(r, **like)
        else:
            # N = 0: the new task starts with zero update; a random M lets N's gradient be non-zero.
            m = (torch.randn(r, r, generator=generator) * (self.factor_init_scale / math.sqrt(r))).to(**like)
            n = torch.zeros(r, r, **like)
        self.factor_M = nn.Parameter(m)
        self.factor_N = nn.Parameter(n)

    def task_core(self, gate: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.factor_M is None:
            return None
        gate = self._runtime.gate if gate is None else gate
        m = self.factor_M if gate is None else self.factor_M * gate.to(self.factor_M.dtype)
        return m @ self.factor_N

    def effective_core(self) -> torch.Tensor:
        """C + M diag(g) N, or the identity for plain LoRA (no task factors)."""
        if not self.task_factors_enabled:
            return torch.eye(self.rank, device=self.core.device, dtype=self.core.dtype)
        task = self.task_core()
        return self.core if task is None else self.core + task

    def fold(self, hard_gate: torch.Tensor | None) -> None:
        """C <- C + M diag(g) N with the final hard gate; the task's factors are dropped."""
        if not self.task_factors_enabled:
            return
        if self.factor_M is None:
            raise AdapterStateError("fold() called with no task in progress")
        with torch.no_grad():
            self.core.add_(self.task_core(hard_gate))
        self.factor_M = None
        self.factor_N = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        core = self.effective_core().to(x.dtype)
        h = F.linear(x, self.lora_A.to(x.dtype))
        h = F.linear(h, core)
        return F.linear(h, self.lora_B.to(x.dtype)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.effective_core() @ self.lora_A) * self.scale


def parse_target(target: str) -> tuple[str, str | None]:
    """'attn.qkv[k]' -> ('attn.qkv', 'k'); 'mlp.fc1' -> ('mlp.fc1', None)."""
    name, _, part = target.partition("[")
    return name, (part.rstrip("]") or None)


class AdaptedLinear(nn.Module):
    """A frozen nn.Linear plus F-LoRA adapters on all of its output rows or on q/k/v slices."""

    def __init__(self, base: nn.Linear, parts: list[str | None], config: AdapterConfig, runtime: AdapterRuntime):
        super().__init__()
        self.base = base
        self._runtime = runtime
        self.adapters = nn.ModuleDict()
        self.slices: dict[str, tuple[int, int]] = {}
        out_features = base.out_features
        for part in parts:
            if part is None:
                key, start, stop = "all", 0, out_features
            else:
                if out_features % 3:
                    raise InjectionError(f"cannot split {out_features} outputs into q, k, v")
                width = out_features // 3
                index = QKV_PARTS.index(part)
                key, start, stop = part, index * width, (index + 1) * width
            if key in self.adapters:
                raise InjectionError(f"adapter part {key!r} given twice for one module")
            self.adapters[key] = FLoRAAdapter(base.in_features, stop - start, config, runtime)
            self.slices[key] = (start, stop)
        if "all" in self.adapters and len(self.adapters) > 1:
            raise InjectionError("a module cannot be adapted both whole and by q/k/v parts")
        # A buffer so that .to(device/dtype) moves it; never saved: it is derived.
        self.register_buffer("merged_weight", None, persistent=False)

    @property
    def merged(self) -> bool:
        return self.merged_weight is not None

    def get_delta_weight(self) -> torch.Tensor:
        delta = torch.zeros_like(self.base.weight)
        for key, adapter in self.adapters.items():
            start, stop = self.slices[key]
            delta[start:stop] = adapter.delta_weight().to(delta.dtype)
        return delta

    def merge(self) -> None:
        """Serve from W0 + delta in one matmul; W0 itself stays untouched. Idempotent."""
        with torch.no_grad():
            self.merged_weight = self.base.weight + self.get_delta_weight()

    def unmerge(self) -> None:
        self.merged_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runtime.bare:
            return self.base(x)
        if self.merged_weight is not None:
            return F.linear(x, self.merged_weight.to(x.dtype), self.base.bias)
        out = self.base(x)
        pieces: list[torch.Tensor] = []
        cursor = 0
        for key, adapter in sorted(self.adapters.items(), key=lambda kv: self.slices[kv[0]][0]):
            start, stop = self.slices[key]
            if start > cursor:
                pieces.append(out.new_zeros(*out.shape[:-1], start - cursor))
            pieces.append(adapter.delta(x))
            cursor = stop
        if cursor < out.shape[-1]:
            pieces.append(out.new_zeros(*out.shape[:-1], out.shape[-1] - cursor))
        return out + torch.cat(pieces, dim=-1)


@dataclass
class _Match:
    module_name: str
    parts: list[str | None] = field(default_factory=list)


def inject_adapters(model: nn.Module, config: AdapterConfig, runtime: AdapterRuntime) -> dict[str, AdaptedLinear]:
    """Wrap every nn.Linear whose name ends with a target; returns them by module name."""
    matches: dict[str, _Match] = {}
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for target in config.targets:
        suffix, part = parse_target(target)
        found = [n for n in linear_names if n == suffix or n.endswith("." + suffix)]
        if not found:
            raise InjectionError(f"adapter target {target!r} matches no nn.Linear in the backbone")
        for name in found:
            matches.setdefault(name, _Match(name)).parts.append(part)
    injected: dict[str, AdaptedLinear] = {}
    for name, match in matches.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = AdaptedLinear(getattr(parent, child), match.parts, config, runtime)
        setattr(parent, child, wrapped)
        injected[name] = wrapped
    return injected
