"""fmlora: FM-LoRA continual learning on frozen timm Vision Transformers."""

from ._version import __version__
from .backbone import Preprocessor, create_backbone, weights_fingerprint
from .config import (
    AdapterConfig,
    BackboneConfig,
    ModelConfig,
    PromptConfig,
    RankSelectorConfig,
    TrainConfig,
    parse_config,
)
from .data import ConcatImages, FileImageSet, ImageSet, ImageSource, TaskData, batches, concat_sources
from .errors import (
    AdapterStateError,
    BackboneError,
    ConfigError,
    DataError,
    FmloraError,
    InjectionError,
    PromptError,
    SnapshotCompatibilityError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotFormatError,
    SnapshotIntegrityError,
    TaskError,
    UnknownTaskError,
    WeightsNotFoundError,
)
from .head import IncrementalHead
from .layers import AdaptedLinear, FLoRAAdapter, inject_adapters
from .learner import Learner, TaskReport, TrainingProgress, evaluate
from .metrics import AccuracyMatrix
from .model import FMLoRAModel, ModelOutput, TaskRecord
from .prompts import PromptBank, PromptChoice
from .rank_selector import RankSelector, task_complexity, task_novelty
from .snapshot import Snapshot, SnapshotManifest, check_compatible, load_snapshot, read_snapshot, save_snapshot
from .strategies import STRATEGIES, apply_strategy
from .synthetic import make_synthetic_stream

__all__ = [
    "STRATEGIES",
    "AccuracyMatrix",
    "AdaptedLinear",
    "AdapterConfig",
    "AdapterStateError",
    "BackboneConfig",
    "BackboneError",
    "ConcatImages",
    "ConfigError",
    "DataError",
    "FLoRAAdapter",
    "FMLoRAModel",
    "FileImageSet",
    "FmloraError",
    "ImageSet",
    "ImageSource",
    "IncrementalHead",
    "InjectionError",
    "Learner",
    "ModelConfig",
    "ModelOutput",
    "Preprocessor",
    "PromptBank",
    "PromptChoice",
    "PromptConfig",
    "PromptError",
    "RankSelector",
    "RankSelectorConfig",
    "Snapshot",
    "SnapshotCompatibilityError",
    "SnapshotError",
    "SnapshotExistsError",
    "SnapshotFormatError",
    "SnapshotIntegrityError",
    "SnapshotManifest",
    "TaskData",
    "TaskError",
    "TaskRecord",
    "TaskReport",
    "TrainConfig",
    "TrainingProgress",
    "UnknownTaskError",
    "WeightsNotFoundError",
    "__version__",
    "apply_strategy",
    "batches",
    "check_compatible",
    "concat_sources",
    "create_backbone",
    "evaluate",
    "inject_adapters",
    "load_snapshot",
    "make_synthetic_stream",
    "parse_config",
    "read_snapshot",
    "save_snapshot",
    "task_complexity",
    "task_novelty",
    "weights_fingerprint",
]
