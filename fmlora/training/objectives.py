"""What a task's training minimises: one objective per head kind.

- ``LinearObjective`` (the linear head): cross-entropy over the head's logits, earlier tasks' classes
  masked out of class-incremental tasks (as InfLoRA and CODA-Prompt do).
- ``PrototypeObjective`` (the ridge head, which is solved after training, not trained): the adapter
  learns features in which the task's images are near their own class and far from *every* class
  seen so far. Logits are scaled cosines to one prototype per class: earlier classes' prototypes are
  their stored feature means (fixed), the task's are trainable, initialised at the class means under
  the model before this task. An optional feature distillation to that model, on the task's own
  images, bounds how far features of earlier classes drift from the statistics stored for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from fmlora.model.model import FMLoRAModel

from .config import TrainConfig
from .statistics import ClassStatistics

__all__ = ["LinearObjective", "Objective", "PrototypeObjective", "class_means"]


class Objective(Protocol):
    def parameters(self) -> list[nn.Parameter]:
        """Parameters the objective itself adds to the optimiser (besides the model's)."""
        ...

    def loss(self, model: FMLoRAModel, x: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``x``: preprocessed images; ``index``: their positions in the task's training set;
        ``labels``: indices into the task's classes."""
        ...


class LinearObjective:
    def __init__(self, model: FMLoRAModel, classes: Sequence[str], config: TrainConfig) -> None:
        self.allowed = model.training_logit_mask().to(model.device)
        column = torch.full((len(self.allowed),), -1, dtype=torch.long)
        column[self.allowed.cpu()] = torch.arange(int(self.allowed.sum()))
        self.target_of = column[[model.head.index_of(c) for c in classes]]
        self.label_smoothing = config.label_smoothing

    def parameters(self) -> list[nn.Parameter]:
        return []

    def loss(self, model: FMLoRAModel, x: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model(x)[:, self.allowed]
        target = self.target_of[labels].to(logits.device)
        return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)


def class_means(features: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    sums = torch.zeros(count, features.shape[1], dtype=torch.float64).index_add_(0, labels, features.double())
    counts = torch.bincount(labels, minlength=count).clamp_min(1).unsqueeze(1)
    return (sums / counts).float()


class PrototypeObjective:
    def __init__(
        self,
        classes: Sequence[str],
        labels: torch.Tensor,
        before: torch.Tensor,
        statistics: ClassStatistics,
        config: TrainConfig,
        device: torch.device,
    ) -> None:
        """``before``: the task's training features under the model as it was before this task."""
        own = set(classes)
        old = [i for i, c in enumerate(statistics.labels) if c not in own]
        self.fixed = statistics.means[old].float().to(device)
        self.prototypes = nn.Parameter(class_means(before, labels, len(classes)).to(device))
        self.before = before.to(device)
        self.scale = config.prototype_scale
        self.distill_weight = config.distill_weight
        self.label_smoothing = config.label_smoothing

    def parameters(self) -> list[nn.Parameter]:
        return [self.prototypes]

    def loss(self, model: FMLoRAModel, x: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features = model.forward_detailed(x).features.float()
        prototypes = torch.cat([self.prototypes, self.fixed])  # the task's classes first: target = label
        logits = self.scale * F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).T
        loss = F.cross_entropy(logits, labels.to(features.device), label_smoothing=self.label_smoothing)
        if self.distill_weight > 0:
            target = self.before[index.to(self.before.device)]
            loss = loss + self.distill_weight * F.mse_loss(features, target)
        return loss
