"""Continual-learning metrics over an accuracy matrix (ARCHITECTURE.md §2, "Metrics").

A[t][j] is the accuracy on task j's test data after training task t (entries with j > t unused).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fmlora.errors import DataError

__all__ = ["AccuracyMatrix"]


@dataclass
class AccuracyMatrix:
    """Per-task accuracies after each task, with each task's test-set size for pooled accuracy."""

    test_sizes: list[int] = field(default_factory=list)
    rows: list[list[float]] = field(default_factory=list)

    def add_row(self, accuracies: Sequence[float], test_sizes: Sequence[int]) -> None:
        t = len(self.rows)
        if len(accuracies) != t + 1 or len(test_sizes) != t + 1:
            raise DataError(f"row {t} needs {t + 1} accuracies (tasks 0..{t})")
        self.test_sizes = list(test_sizes)
        self.rows.append([float(a) for a in accuracies])

    @property
    def num_tasks(self) -> int:
        return len(self.rows)

    def seen_accuracy(self, t: int) -> float:
        """Accuracy over all test samples of tasks 0..t after task t (no task id given)."""
        sizes = self.test_sizes[: t + 1]
        return sum(a * n for a, n in zip(self.rows[t], sizes, strict=True)) / sum(sizes)

    def accuracy_curve(self) -> list[float]:
        return [self.seen_accuracy(t) for t in range(self.num_tasks)]

    def final_accuracy(self) -> float:
        return self.seen_accuracy(self.num_tasks - 1)

    def average_incremental_accuracy(self) -> float:
        curve = self.accuracy_curve()
        return sum(curve) / len(curve)

    def forgetting(self) -> float:
        """Mean over old tasks j of (best accuracy before the last task - final accuracy); 0 for one task."""
        last = self.num_tasks - 1
        if last < 1:
            return 0.0
        drops = [max(self.rows[t][j] for t in range(j, last)) - self.rows[last][j] for j in range(last)]
        return sum(drops) / len(drops)

    def as_lists(self) -> list[list[float]]:
        return [list(row) for row in self.rows]

    def summary(self) -> dict[str, object]:
        return {
            "accuracy_matrix": self.as_lists(),
            "accuracy_curve": self.accuracy_curve(),
            "final_accuracy": self.final_accuracy(),
            "average_incremental_accuracy": self.average_incremental_accuracy(),
            "forgetting": self.forgetting(),
        }
