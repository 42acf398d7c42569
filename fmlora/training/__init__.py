"""Training: the learner that trains one task after another, the baseline strategies, the
accuracy matrix and its metrics, and backbone pre-training.

May import ``fmlora.model`` and ``fmlora.data``.
"""

from .config import TrainConfig
from .learner import Learner, TaskReport, TrainingProgress, evaluate
from .metrics import AccuracyMatrix
from .pretrain import BatchSampler, linear_probe, pretrain_backbone
from .strategies import STRATEGIES, apply_strategy

__all__ = [
    "STRATEGIES",
    "AccuracyMatrix",
    "BatchSampler",
    "Learner",
    "TaskReport",
    "TrainConfig",
    "TrainingProgress",
    "apply_strategy",
    "evaluate",
    "linear_probe",
    "pretrain_backbone",
]
