"""Training: the learner that trains one task after another, the baseline strategies, the
accuracy matrix and its metrics, and backbone pre-training.

May import ``fmlora.model`` and ``fmlora.data``.
"""

from .config import TrainConfig
from .drift import AffineDrift, compensate_drift, fit_affine_drift
from .learner import (
    Learner,
    TaskReport,
    TrainingProgress,
    collect_features,
    evaluate,
    fold_in_held_out,
    new_statistics,
    within_task_error,
)
from .metrics import AccuracyMatrix
from .pretrain import BatchSampler, linear_probe, pretrain_backbone
from .statistics import ClassStatistics, RidgeSolution, held_out_split, ncm_logits
from .strategies import STRATEGIES, TRAINING, apply_strategy, apply_training_strategy

__all__ = [
    "STRATEGIES",
    "TRAINING",
    "AccuracyMatrix",
    "AffineDrift",
    "BatchSampler",
    "ClassStatistics",
    "Learner",
    "RidgeSolution",
    "TaskReport",
    "TrainConfig",
    "TrainingProgress",
    "apply_strategy",
    "apply_training_strategy",
    "collect_features",
    "compensate_drift",
    "evaluate",
    "fit_affine_drift",
    "fold_in_held_out",
    "held_out_split",
    "linear_probe",
    "ncm_logits",
    "new_statistics",
    "pretrain_backbone",
    "within_task_error",
]
