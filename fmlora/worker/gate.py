"""The promotion gate: what a candidate version must show before it may go live.

Besides bounds on the new task's accuracy and on forgetting, the gate protects users from training
that makes things worse than not training at all: on the same held-out images, a candidate must not
fall below a training-free baseline — nearest class mean (cosine) on the frozen backbone's features,
from class statistics the worker keeps — on the new task, nor over all classes, by more than
``baseline_tolerance``. A rejected candidate is kept with its card and the reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GateConfig"]


@dataclass(frozen=True)
class GateConfig:
    """Promotion bounds: a candidate that misses any of them is kept as 'rejected' and never goes live."""

    min_new_task_accuracy: float = 0.0
    max_forgetting: float = 1.0  # the largest allowed drop of any earlier task's accuracy vs the parent
    # Compare with the training-free baseline; None turns that check off. The tolerance absorbs the
    # noise of small held-out sets: a glyph task's held-out fifth is 80 images, one image 1.25 points,
    # and 0.02 rejected a task of the demo at 78.75 % against the baseline's 81.25 %.
    baseline_tolerance: float | None = 0.05

    def check(
        self,
        new_task_accuracy: float,
        forgetting: dict[str, float],
        overall: float | None = None,
        baseline: dict[str, float] | None = None,
    ) -> list[str]:
        """Reasons to reject (empty: promote). ``baseline``: the training-free baseline's ``new_task``
        and ``overall`` accuracy on the same held-out images."""
        reasons = []
        if new_task_accuracy < self.min_new_task_accuracy:
            reasons.append(
                f"new-task accuracy {new_task_accuracy:.4f} is below the minimum {self.min_new_task_accuracy:.4f}"
            )
        for task, drop in forgetting.items():
            if drop > self.max_forgetting:
                reasons.append(
                    f"accuracy on earlier task {task!r} dropped by {drop:.4f}, over the gate's maximum "
                    f"{self.max_forgetting:.4f}"
                )
        if self.baseline_tolerance is not None and baseline is not None:
            checks = (("new-task", new_task_accuracy, "new_task"), ("all-class", overall, "overall"))
            for what, accuracy, key in checks:
                floor = baseline.get(key)
                if accuracy is not None and floor is not None and accuracy < floor - self.baseline_tolerance:
                    reasons.append(
                        f"{what} accuracy {accuracy:.4f} is below the training-free baseline's {floor:.4f} "
                        f"(nearest class mean on the frozen backbone, same held-out images)"
                    )
        return reasons
