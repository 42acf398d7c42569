"""fmlora: FM-LoRA continual learning on frozen timm Vision Transformers.

The top-level namespace is the small public API that README's "Using the library" uses. Everything
else lives in the sub-packages, one concept each (see ARCHITECTURE.md):

    fmlora.model     the adapted ViT: F-LoRA layers, rank selector, meta-prompts, head, snapshots
    fmlora.training  the learner, baseline strategies, metrics, backbone pre-training
    fmlora.data      image sources, benchmark streams, task archives
    fmlora.registry  tasks and versions, task intake, publishing
    fmlora.worker    the training worker
    fmlora.bench     ``fmlora bench``
    fmlora.export    ONNX export
    fmlora.errors    the FmloraError tree
"""

from ._version import __version__
from .data import ImageSet, TaskData, make_glyph_stream, make_synthetic_stream
from .errors import FmloraError
from .model import (
    AdapterConfig,
    BackboneConfig,
    FMLoRAModel,
    ModelConfig,
    PromptConfig,
    RankSelectorConfig,
    load_snapshot,
    save_snapshot,
)
from .registry import Registry, publish_version, submit_task
from .training import AccuracyMatrix, Learner, TrainConfig
from .worker import GateConfig, Worker, WorkerConfig

__all__ = [
    "AccuracyMatrix",
    "AdapterConfig",
    "BackboneConfig",
    "FMLoRAModel",
    "FmloraError",
    "GateConfig",
    "ImageSet",
    "Learner",
    "ModelConfig",
    "PromptConfig",
    "RankSelectorConfig",
    "Registry",
    "TaskData",
    "TrainConfig",
    "Worker",
    "WorkerConfig",
    "__version__",
    "load_snapshot",
    "make_glyph_stream",
    "make_synthetic_stream",
    "publish_version",
    "save_snapshot",
    "submit_task",
]
