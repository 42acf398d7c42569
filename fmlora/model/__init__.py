"""The model: a frozen timm ViT with F-LoRA adapters, the rank selector, the meta-prompts, the head,
their configs, and the snapshot format that serialises the adapter.

Imports only ``fmlora.errors`` and third-party libraries (torch, timm, safetensors, pydantic).
"""

from .backbone import OFFLINE_BACKBONE, Preprocessor, create_backbone, weights_fingerprint
from .config import (
    OFFLINE_MODEL_KWARGS,
    OFFLINE_WEIGHTS,
    AdapterConfig,
    BackboneConfig,
    FrozenConfig,
    HeadConfig,
    ModelConfig,
    PromptConfig,
    RankSelectorConfig,
    override_backbone,
    parse_config,
)
from .head import IncrementalHead, RandomFeatures
from .layers import AdaptedLinear, AdapterRuntime, FLoRAAdapter, inject_adapters, parse_target
from .model import FMLoRAModel, ModelOutput, TaskRecord
from .prompts import PrefixAttention, PromptBank, PromptChoice, PromptRouting
from .rank_selector import RankSelector, task_complexity, task_novelty
from .snapshot import (
    CONFIG_FILE,
    FORMAT_VERSION,
    TENSOR_FILE,
    BackboneInfo,
    Snapshot,
    SnapshotManifest,
    check_compatible,
    load_snapshot,
    read_snapshot,
    save_snapshot,
    sha256_file,
)

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "OFFLINE_BACKBONE",
    "OFFLINE_MODEL_KWARGS",
    "OFFLINE_WEIGHTS",
    "TENSOR_FILE",
    "AdaptedLinear",
    "AdapterConfig",
    "AdapterRuntime",
    "BackboneConfig",
    "BackboneInfo",
    "FLoRAAdapter",
    "FMLoRAModel",
    "FrozenConfig",
    "HeadConfig",
    "IncrementalHead",
    "ModelConfig",
    "ModelOutput",
    "PrefixAttention",
    "Preprocessor",
    "PromptBank",
    "PromptChoice",
    "PromptConfig",
    "PromptRouting",
    "RandomFeatures",
    "RankSelector",
    "RankSelectorConfig",
    "Snapshot",
    "SnapshotManifest",
    "TaskRecord",
    "check_compatible",
    "create_backbone",
    "inject_adapters",
    "load_snapshot",
    "override_backbone",
    "parse_config",
    "parse_target",
    "read_snapshot",
    "save_snapshot",
    "sha256_file",
    "task_complexity",
    "task_novelty",
    "weights_fingerprint",
]
