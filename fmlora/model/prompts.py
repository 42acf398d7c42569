"""Dynamic meta-prompts (DMP): a fixed bank of prefix prompts mixed per input in a single pass.

The bank holds K prompts, each L prefix keys and values for every block in [start, end), and one key
per prompt. The [CLS] token entering block ``start`` is the query; a = softmax(cos(query, keys) / T)
mixes the bank into one prefix per input. A request may instead name a task (its stored task key is
the query) or ask for ``none`` (no prefix). The bank never grows; a drift penalty keeps it close to
its state before the current task so earlier tasks keep their prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from fmlora.errors import ConfigError, PromptError, TaskError, UnknownTaskError

from ._threadlocal import PerThread
from .config import PromptConfig

__all__ = ["PrefixAttention", "PromptBank", "PromptChoice", "PromptRouting"]


@dataclass(frozen=True)
class PromptChoice:
    mode: Literal["auto", "none", "task"] = "auto"
    task: str | None = None

    @classmethod
    def parse(cls, value: Any) -> PromptChoice:
        """Accepts 'auto', 'none', {'task': NAME} or a PromptChoice."""
        if isinstance(value, PromptChoice):
            return value
        if value is None or value == "auto":
            return cls("auto")
        if value == "none":
            return cls("none")
        if isinstance(value, dict) and set(value) == {"task"} and isinstance(value["task"], str):
            return cls("task", value["task"])
        raise PromptError(f"prompt must be 'auto', 'none' or {{'task': NAME}}, got {value!r}")


@dataclass
class PromptRouting:
    """Per-batch prompt state, set before the prompted blocks run and read by them."""

    choices: list[PromptChoice]
    active: torch.Tensor  # (B,) bool: whether each input gets a prefix
    weights: torch.Tensor | None = None  # (B, K) mixture weights
    prefix: torch.Tensor | None = None  # (B, blocks, 2, L, attn_dim)
    query: torch.Tensor | None = None  # (B, D)


class PromptBank(nn.Module):
    def __init__(self, config: PromptConfig, embed_dim: int, attn_dim: int, depth: int):
        super().__init__()
        self.config = config
        self.start, self.end = config.block_range(depth)
        blocks = self.end - self.start
        self.prompts = nn.Parameter(torch.randn(config.bank_size, blocks, 2, config.length, attn_dim) * config.init_std)
        self.keys = nn.Parameter(torch.randn(config.bank_size, embed_dim) * config.init_std)
        self.register_buffer("task_keys", torch.zeros(0, embed_dim))
        self.task_names: list[str] = []
        # The bank as it was before the current task; drift from it is penalised.
        self.register_buffer("_anchor_prompts", torch.zeros(0), persistent=False)
        self.register_buffer("_anchor_keys", torch.zeros(0), persistent=False)
        self._local = PerThread()

    # -- per-batch routing -------------------------------------------------------------------
    @property
    def routing(self) -> PromptRouting | None:
        return self._local.get("routing")

    @routing.setter
    def routing(self, value: PromptRouting | None) -> None:
        self._local.set("routing", value)

    def task_index(self, name: str) -> int:
        try:
            return self.task_names.index(name)
        except ValueError:
            known = ", ".join(self.task_names) or "none yet"
            raise UnknownTaskError(f"unknown task {name!r} for prompt selection (known: {known})") from None

    def validate_choices(self, choices: Sequence[PromptChoice]) -> None:
        for choice in choices:
            if choice.mode == "task":
                self.task_index(choice.task or "")

    def mixture_weights(self, query: torch.Tensor, choices: Sequence[PromptChoice]) -> torch.Tensor:
        """(B, K) weights: from each input's own query (auto) or from a named task's key."""
        q = query.detach()
        named = [(i, self.task_index(c.task or "")) for i, c in enumerate(choices) if c.mode == "task"]
        if named:
            q = q.clone()
            for row, task in named:
                q[row] = self.task_keys[task].to(q.dtype)
        cos = F.cosine_similarity(q.unsqueeze(1), self.keys.to(q.dtype).unsqueeze(0), dim=-1)
        return torch.softmax(cos / self.config.temperature, dim=-1)

    def route(self, query: torch.Tensor) -> None:
        """Called with the [CLS] token entering block ``start``: fixes this batch's prefixes."""
        routing = self.routing
        if routing is None:
            return
        weights = self.mixture_weights(query, routing.choices)
        routing.query = query.detach()
        routing.weights = weights
        routing.prefix = torch.einsum("bk,knsld->bnsld", weights, self.prompts.to(weights.dtype))

    def nearest_tasks(self, query: torch.Tensor) -> torch.Tensor | None:
        """Index of the task key closest to each query (None before any task is recorded)."""
        if not self.task_names:
            return None
        cos = F.cosine_similarity(query.unsqueeze(1), self.task_keys.to(query.dtype).unsqueeze(0), dim=-1)
        return cos.argmax(dim=-1)

    # -- continual learning ------------------------------------------------------------------
    def begin_task(self) -> None:
        self._anchor_prompts = self.prompts.detach().clone()
        self._anchor_keys = self.keys.detach().clone()

    def drift_penalty(self) -> torch.Tensor:
        if self._anchor_prompts.numel() == 0 or not self.task_names:
            return self.prompts.new_zeros(())
        drift = (self.prompts - self._anchor_prompts).pow(2).sum() + (self.keys - self._anchor_keys).pow(2).sum()
        return self.config.drift_penalty * drift

    def record_task(self, name: str, key: torch.Tensor) -> None:
        """Store a task's key (the mean query of its data) so requests can select it by name."""
        if key.numel() != self.task_keys.shape[1]:
            raise TaskError(f"a task key needs {self.task_keys.shape[1]} values, got {key.numel()}")
        if name in self.task_names:
            raise TaskError(f"task {name!r} already has a key")
        key = key.detach().to(self.task_keys.dtype).reshape(1, -1)
        self.task_keys = torch.cat([self.task_keys, key.to(self.task_keys.device)], dim=0)
        self.task_names.append(name)


class PrefixAttention(nn.Module):
    """Runs a timm Attention module with the bank's prefix keys/values prepended.

    The wrapped module's own projections and norms are used; only the attention call gains the
    prefix. Inputs routed to ``none`` are masked off the prefix, so a mixed batch equals running each
    input alone.
    """

    def __init__(self, inner: nn.Module, bank: PromptBank, slot: int):
        super().__init__()
        for attr in ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "proj", "proj_drop"):
            if not hasattr(inner, attr):
                raise ConfigError(
                    f"prompts need a timm Attention with a fused qkv; {type(inner).__name__} lacks {attr}"
                )
        self.inner = inner
        self.slot = slot
        self._bank = [bank]  # a list keeps the bank out of this module's children

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        routing = self._bank[0].routing
        if routing is None or routing.prefix is None or not bool(routing.active.any()):
            return self.inner(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ConfigError("meta-prompts cannot be combined with an attention mask")
        inner = self.inner
        b, n, _ = x.shape
        heads, head_dim = inner.num_heads, inner.head_dim
        gate = inner.gate(x).sigmoid() if getattr(inner, "gate", None) is not None else None
        qkv = inner.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = inner.q_norm(q), inner.k_norm(k)
        prefix = routing.prefix[:, self.slot].to(x.dtype)  # (B, 2, L, attn_dim)
        length = prefix.shape[2]
        pk = prefix[:, 0].reshape(b, length, heads, head_dim).transpose(1, 2)
        pv = prefix[:, 1].reshape(b, length, heads, head_dim).transpose(1, 2)
        k = torch.cat([pk, k], dim=2)
        v = torch.cat([pv, v], dim=2)
        mask = None
        if not bool(routing.active.all()):
            mask = torch.ones(b, 1, 1, length + n, dtype=torch.bool, device=x.device)
            mask[:, 0, 0, :length] = routing.active.to(x.device).unsqueeze(1)
        dropout = inner.attn_drop.p if self.training and hasattr(inner, "attn_drop") else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(b, n, heads * head_dim)
        out = inner.norm(out) if hasattr(inner, "norm") else out
        if gate is not None:
            out = out * gate
        return inner.proj_drop(inner.proj(out))
