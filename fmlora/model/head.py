"""One linear head over every class seen so far, grown by class-incremental tasks.

Rows of earlier tasks are stored apart from the rows the current task trains, so an optimizer (with
or without weight decay) can never move them, and the trainable-parameter count is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fmlora.errors import TaskError

__all__ = ["IncrementalHead"]


class IncrementalHead(nn.Module):
    def __init__(self, in_features: int, init_std: float = 0.02):
        super().__init__()
        self.in_features = in_features
        self.init_std = init_std
        self.register_buffer("frozen_weight", torch.zeros(0, in_features))
        self.register_buffer("frozen_bias", torch.zeros(0))
        self.trainable_weight = nn.Parameter(torch.zeros(0, in_features))
        self.trainable_bias = nn.Parameter(torch.zeros(0))
        self.labels: list[str] = []
        self.label_tasks: list[str] = []

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def index_of(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise TaskError(f"unknown class {label!r}") from None

    def begin_task(
        self,
        task: str,
        classes: Sequence[str],
        kind: str,
        train_old_rows: bool,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """Add the task's new classes as trainable rows; returns the classes that were new.

        ``train_old_rows``: domain-incremental tasks retrain the shared rows of the classes they reuse.
        """
        self.consolidate()
        new = [c for c in classes if c not in self.labels]
        if kind == "class" and len(new) != len(classes):
            known = sorted(set(classes) - set(new))
            raise TaskError(f"class-incremental task {task!r} repeats known classes: {known}")
        like = {"device": self.frozen_weight.device, "dtype": self.frozen_weight.dtype}
        weight = (torch.randn(len(new), self.in_features, generator=generator) * self.init_std).to(**like)
        bias = torch.zeros(len(new), **like)
        if train_old_rows:
            weight = torch.cat([self.frozen_weight, weight])
            bias = torch.cat([self.frozen_bias, bias])
            self.frozen_weight = self.frozen_weight[:0].clone()
            self.frozen_bias = self.frozen_bias[:0].clone()
        self.trainable_weight = nn.Parameter(weight)
        self.trainable_bias = nn.Parameter(bias)
        self.labels.extend(new)
        self.label_tasks.extend([task] * len(new))
        return new

    def consolidate(self) -> None:
        """Freeze every row (end of a task)."""
        if self.trainable_weight.numel() == 0 and self.trainable_bias.numel() == 0:
            return
        self.frozen_weight = torch.cat([self.frozen_weight, self.trainable_weight.detach()])
        self.frozen_bias = torch.cat([self.frozen_bias, self.trainable_bias.detach()])
        self.trainable_weight = nn.Parameter(self.frozen_weight[:0].clone())
        self.trainable_bias = nn.Parameter(self.frozen_bias[:0].clone())

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.frozen_weight, self.trainable_weight])

    @property
    def bias(self) -> torch.Tensor:
        return torch.cat([self.frozen_bias, self.trainable_bias])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.num_classes == 0:
            raise TaskError("the model has learned no classes yet")
        return nn.functional.linear(features, self.weight.to(features.dtype), self.bias.to(features.dtype))

    def state(self) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
        """Everything needed to restore the head exactly (see ``load``)."""
        return self.weight.detach().clone(), self.bias.detach().clone(), list(self.labels), list(self.label_tasks)

    def load(self, weight: torch.Tensor, bias: torch.Tensor, labels: list[str], label_tasks: list[str]) -> None:
        self.frozen_weight = weight.detach().clone()
        self.frozen_bias = bias.detach().clone()
        self.trainable_weight = nn.Parameter(self.frozen_weight[:0].clone())
        self.trainable_bias = nn.Parameter(self.frozen_bias[:0].clone())
        self.labels = list(labels)
        self.label_tasks = list(label_tasks)
