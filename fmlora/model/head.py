"""One head over every class seen so far, grown by class-incremental tasks.

Rows of earlier tasks are stored apart from the rows the current task trains, so an optimizer (with
or without weight decay) can never move them, and the trainable-parameter count is exact.

The rows act on the backbone's features, or on ``RandomFeatures`` of them (``ReLU(P f)``, the
ridge head's feature map): ``P`` is a buffer regenerated from a seed, never part of a snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fmlora.errors import TaskError

__all__ = ["IncrementalHead", "RandomFeatures"]


class RandomFeatures(nn.Module):
    """``h = ReLU(P f)`` with ``P`` (dim x in_features) drawn from N(0, 1) by a seeded generator."""

    def __init__(self, in_features: int, dim: int, seed: int) -> None:
        super().__init__()
        if dim < 1 or in_features < 1:
            raise TaskError("random features need positive sizes")
        self.in_features, self.dim, self.seed = in_features, dim, seed
        generator = torch.Generator().manual_seed(seed)
        # Not persistent: the seed regenerates it, so snapshots never carry it.
        self.register_buffer("projection", torch.randn(dim, in_features, generator=generator), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.relu(nn.functional.linear(features, self.projection.to(features.dtype)))


class IncrementalHead(nn.Module):
    def __init__(
        self,
        in_features: int,
        init_std: float = 0.02,
        feature_map: RandomFeatures | None = None,
        *,
        solved_row_dtype: str = "float32",
    ):
        super().__init__()
        if solved_row_dtype not in ("float32", "float16"):
            raise TaskError(f"solved rows are kept in float32 or float16, not {solved_row_dtype}")
        self.solved_row_dtype = solved_row_dtype
        if feature_map is not None and feature_map.in_features != in_features:
            raise TaskError("the feature map's input size must be the head's")
        self.in_features = in_features
        self.feature_map = feature_map
        self.row_features = feature_map.dim if feature_map is not None else in_features
        self.init_std = init_std
        self.register_buffer("frozen_weight", torch.zeros(0, self.row_features))
        self.register_buffer("frozen_bias", torch.zeros(0))
        self.trainable_weight = nn.Parameter(torch.zeros(0, self.row_features))
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
        weight = (torch.randn(len(new), self.row_features, generator=generator) * self.init_std).to(**like)
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

    def lift(self, features: torch.Tensor) -> torch.Tensor:
        """What the rows act on: the features, or their random features."""
        return features if self.feature_map is None else self.feature_map(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.num_classes == 0:
            raise TaskError("the model has learned no classes yet")
        rows = self.lift(features)
        return nn.functional.linear(rows, self.weight.to(rows.dtype), self.bias.to(rows.dtype))

    def set_rows(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Replace every row at once (a solved head), in label order; nothing may be training."""
        if self.trainable_weight.numel() or self.trainable_bias.numel():
            raise TaskError("cannot replace the rows while a task trains some of them")
        if tuple(weight.shape) != (self.num_classes, self.row_features):
            raise TaskError(f"solved rows must be ({self.num_classes}, {self.row_features}), got {tuple(weight.shape)}")
        like = {"device": self.frozen_weight.device, "dtype": self.frozen_weight.dtype}
        weight = weight.detach()
        if self.solved_row_dtype == "float16":
            rounded = weight.half()
            # Rounded once, here: evaluation, snapshots and every engine then see the same rows.
            if bool(torch.isfinite(rounded).all()):
                weight = rounded
        self.frozen_weight = weight.to(**like).clone()
        self.frozen_bias = (torch.zeros(self.num_classes) if bias is None else bias.detach()).to(**like).clone()

    def publishable_weight(self) -> torch.Tensor:
        """The rows as a snapshot stores them: float16 when they were solved into it (lossless,
        since ``set_rows`` rounded them), otherwise as kept."""
        weight = self.weight.detach()
        if self.solved_row_dtype == "float16" and weight.is_floating_point() and weight.dtype != torch.float16:
            half = weight.half()
            if bool(torch.isfinite(half).all()) and torch.equal(half.to(weight.dtype), weight):
                return half
        return weight

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
