"""fmlora: FM-LoRA continual learning on frozen timm Vision Transformers."""

from ._version import __version__
from .backbone import OFFLINE_BACKBONE, Preprocessor, create_backbone, weights_fingerprint
from .bench import BENCHMARKS, METHODS, BenchSpec, run_benchmark
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
from .datasets import PAPER_BENCHMARKS, load_cifar100, load_cub200, load_domainnet, load_imagenet_r
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
from .glyphs import make_glyph_stream, pretraining_characters
from .head import IncrementalHead
from .layers import AdaptedLinear, FLoRAAdapter, inject_adapters
from .learner import Learner, TaskReport, TrainingProgress, evaluate
from .metrics import AccuracyMatrix
from .model import FMLoRAModel, ModelOutput, TaskRecord
from .pretrain import pretrain_backbone
from .prompts import PromptBank, PromptChoice
from .rank_selector import RankSelector, task_complexity, task_novelty
from .snapshot import Snapshot, SnapshotManifest, check_compatible, load_snapshot, read_snapshot, save_snapshot
from .strategies import STRATEGIES, apply_strategy
from .synthetic import make_synthetic_stream

__all__ = [
    "BENCHMARKS",
    "METHODS",
    "OFFLINE_BACKBONE",
    "PAPER_BENCHMARKS",
    "STRATEGIES",
    "AccuracyMatrix",
    "AdaptedLinear",
    "AdapterConfig",
    "AdapterStateError",
    "BackboneConfig",
    "BackboneError",
    "BenchSpec",
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
    "load_cifar100",
    "load_cub200",
    "load_domainnet",
    "load_imagenet_r",
    "load_snapshot",
    "make_glyph_stream",
    "make_synthetic_stream",
    "parse_config",
    "pretrain_backbone",
    "pretraining_characters",
    "read_snapshot",
    "run_benchmark",
    "save_snapshot",
    "task_complexity",
    "task_novelty",
    "weights_fingerprint",
]
