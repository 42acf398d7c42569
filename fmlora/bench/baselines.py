"""Training-free baselines on the frozen backbone: what a user gets without training anything.

- ``ncm``: nearest class mean by cosine similarity (SimpleCIL).
- ``ranpac``: random projection to ``RANPAC_DIM`` ReLU features and a ridge classifier solved from
  the running Gram matrix, λ chosen on a held-out fifth of each task's training data (RanPAC
  without its first-task adaptation).

Both are rehearsal-free: after each task they keep class statistics, never images, and they are
evaluated exactly like the learners (one accuracy-matrix row per task, no task id).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fmlora.data.images import ImageSource, TaskData
from fmlora.model.config import ModelConfig
from fmlora.model.head import RandomFeatures
from fmlora.model.model import FMLoRAModel
from fmlora.training.config import TrainConfig
from fmlora.training.learner import collect_features
from fmlora.training.metrics import AccuracyMatrix
from fmlora.training.statistics import ClassStatistics, ncm_logits

__all__ = ["BASELINES", "RANPAC_DIM", "run_baseline"]

BASELINES = ("ncm", "ranpac")
RANPAC_DIM = 2000


def _features(model: FMLoRAModel, data: ImageSource, train: TrainConfig) -> torch.Tensor:
    return collect_features(model, data, train.eval_batch_size, model.backbone_features, train.loader_workers)


def _accuracy(scores: torch.Tensor, data: ImageSource, labels: Sequence[str]) -> float:
    position = {c: i for i, c in enumerate(labels)}
    target = torch.tensor([position[c] for c in data.classes], dtype=torch.long)[data.labels]
    return float((scores.argmax(dim=1) == target).double().mean())


def run_baseline(
    method: str, config: ModelConfig, tasks: Sequence[TaskData], train: TrainConfig, seed: int
) -> dict[str, Any]:
    model = FMLoRAModel(config).to(train.device).eval()
    random_features = RandomFeatures(model.embed_dim, RANPAC_DIM, seed) if method == "ranpac" else None
    stats = ClassStatistics(model.embed_dim, random_features)
    test_features = [_features(model, t.test, train) for t in tasks]
    matrix = AccuracyMatrix()
    lambdas: list[float] = []
    for t, task in enumerate(tasks):
        features = _features(model, task.train, train)
        if method == "ranpac":
            # RanPAC's own recipe: λ decided on each task's held-out fifth alone, by plain arg-max.
            solution = stats.add_task(
                features,
                task.train.labels,
                task.train.classes,
                seed=seed * 1009 + t,
                selection="task",
                tolerance=None,
                scoring="held_out",
            )
            lambdas.append(solution.relative_lambda)
            scores = [stats.logits(f, solution.weight) for f in test_features[: t + 1]]
        else:
            stats.add(features, task.train.labels, task.train.classes)
            scores = [ncm_logits(f, stats.means) for f in test_features[: t + 1]]
        seen = tasks[: t + 1]
        row = [_accuracy(s, task_.test, stats.labels) for s, task_ in zip(scores, seen, strict=True)]
        matrix.add_row(row, [len(s.test) for s in seen])
    head_floats = len(stats.labels) * (stats.dim if method == "ranpac" else stats.in_features)
    return {
        **matrix.summary(),
        "trainable_params_per_task": [0] * len(tasks),
        "adapter_bytes_per_task": [0] * len(tasks),
        "head_bytes": head_floats * 4,
        "ranks": [],
        "task_complexity": [],
        **({"relative_lambdas": lambdas} if lambdas else {}),
    }
