"""FMLoRAModel: a frozen timm ViT with F-LoRA layers, the rank selector, meta-prompts and a head."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .backbone import Preprocessor, create_backbone, weights_fingerprint
from .config import ModelConfig
from .errors import AdapterStateError, ConfigError, TaskError
from .head import IncrementalHead
from .layers import AdaptedLinear, GateState, inject_adapters
from .prompts import PrefixAttention, PromptBank, PromptChoice, PromptRouting
from .rank_selector import RankSelector

__all__ = ["FMLoRAModel", "ModelOutput", "TaskRecord"]

TaskKind = Literal["class", "domain"]


class TaskRecord(BaseModel):
    """What a learned task left behind; stored in every snapshot's manifest."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: TaskKind
    classes: tuple[str, ...]
    new_classes: tuple[str, ...]
    rank: int
    complexity: float
    novelty: float


@dataclass
class _TaskInProgress:
    name: str
    kind: TaskKind
    classes: tuple[str, ...]
    new_classes: tuple[str, ...]
    complexity: float
    novelty: float


@dataclass
class ModelOutput:
    logits: torch.Tensor
    features: torch.Tensor
    prompt_choices: list[PromptChoice]
    prompt_weights: torch.Tensor | None  # (B, K); rows of inputs without a prefix are meaningless
    prompt_active: torch.Tensor | None  # (B,) bool
    query: torch.Tensor | None  # (B, D): [CLS] entering the first prompted block
    nearest_task: torch.Tensor | None  # (B,) index into model.tasks


class FMLoRAModel(nn.Module):
    def __init__(self, config: ModelConfig, backbone: nn.Module | None = None):
        super().__init__()
        self.config = config
        backbone = create_backbone(config.backbone) if backbone is None else backbone
        backbone.requires_grad_(False)
        # Fingerprint before injection: it identifies the weights, not our wrappers.
        self.backbone_sha256 = weights_fingerprint(backbone)
        self.preprocessor = Preprocessor.for_model(backbone, config.backbone.data_config_overrides)
        self.embed_dim = int(backbone.num_features)
        self.depth = len(backbone.blocks)
        first_attn = backbone.blocks[0].attn
        attn_dim = int(first_attn.qkv.out_features // 3) if hasattr(first_attn, "qkv") else self.embed_dim
        self.has_class_token = getattr(backbone, "cls_token", None) is not None

        self.gate = GateState()
        self.adapted: dict[str, AdaptedLinear] = inject_adapters(backbone, config.adapter, self.gate)
        self.backbone = backbone
        self.rank_selector = RankSelector(config.adapter.rank, config.rank_selector)
        self.prompt_bank: PromptBank | None = None
        if config.prompts.enabled:
            bank = PromptBank(config.prompts, self.embed_dim, attn_dim, self.depth)
            for slot, block_index in enumerate(range(bank.start, bank.end)):
                block = backbone.blocks[block_index]
                block.attn = PrefixAttention(block.attn, bank, slot)
            backbone.blocks[bank.start].register_forward_pre_hook(self._route_prompts)
            self.prompt_bank = bank
        self.head = IncrementalHead(self.embed_dim, config.head_init_std)
        self.register_buffer("task_feature_means", torch.zeros(0, self.embed_dim))
        self.tasks: list[TaskRecord] = []
        self._task: _TaskInProgress | None = None
        self._prompts_on = True
        self._set_trainable(bases=True, prompts=False)

    # -- modes ---------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FMLoRAModel:
        # The frozen backbone always runs as in eval (no dropout/drop-path), as the protocol fixes;
        # training mode only turns on the rank selector's Gumbel noise.
        super().train(mode)
        self.backbone.eval()
        return self

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The bare backbone: no F-LoRA update and no meta-prompts."""
        previous = self._prompts_on
        for layer in self.adapted.values():
            layer.enabled = False
        self._prompts_on = False
        try:
            yield
        finally:
            for layer in self.adapted.values():
                layer.enabled = True
            self._prompts_on = previous

    @property
    def task_in_progress(self) -> bool:
        return self._task is not None

    @property
    def labels(self) -> list[str]:
        return list(self.head.labels)

    @property
    def device(self) -> torch.device:
        return self.head.frozen_weight.device

    # -- forward -------------------------------------------------------------------------------
    def _route_prompts(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.prompt_bank is None or self.prompt_bank.routing is None:
            return
        tokens = args[0]
        query = tokens[:, 0] if self.has_class_token else tokens.mean(dim=1)
        self.prompt_bank.route(query)

    def _choices(self, prompts: Any, batch: int) -> list[PromptChoice]:
        if prompts is None or isinstance(prompts, (str, dict, PromptChoice)):
            choices = [PromptChoice.parse(prompts)] * batch
        else:
            choices = [PromptChoice.parse(p) for p in prompts]
            if len(choices) != batch:
                raise ConfigError(f"{len(choices)} prompt choices for a batch of {batch}")
        if self.prompt_bank is not None:
            self.prompt_bank.validate_choices(choices)
        return choices

    def _update_gate(self) -> None:
        if self._task is None or not self.rank_selector.enabled:
            self.gate.value = None
        elif self.training:
            self.gate.value = self.rank_selector.sample_gate()
        else:
            self.gate.value = self.rank_selector.hard_gate()

    def forward_detailed(self, images: torch.Tensor, prompts: Any = None) -> ModelOutput:
        """Logits plus the meta-prompt each input used. ``images`` are preprocessed float tensors.

        ``prompts``: one choice for the whole batch ('auto', 'none', {'task': NAME}) or one per input.
        """
        batch = images.shape[0]
        choices = self._choices(prompts, batch)
        bank = self.prompt_bank if self._prompts_on else None
        routing = None
        if bank is not None:
            active = torch.tensor([c.mode != "none" for c in choices], dtype=torch.bool)
            routing = PromptRouting(choices=choices, active=active)
            bank.routing = routing
        self._update_gate()
        try:
            tokens = self.backbone.forward_features(images)
            features = self.backbone.forward_head(tokens, pre_logits=True)
            logits = self.head(features)
        finally:
            if bank is not None:
                bank.routing = None
        nearest = None
        if routing is not None and routing.query is not None and bank is not None:
            nearest = bank.nearest_tasks(routing.query)
        return ModelOutput(
            logits=logits,
            features=features,
            prompt_choices=choices,
            prompt_weights=None if routing is None else routing.weights,
            prompt_active=None if routing is None else routing.active,
            query=None if routing is None else routing.query,
            nearest_task=nearest,
        )

    def forward(self, images: torch.Tensor, prompts: Any = None) -> torch.Tensor:
        return self.forward_detailed(images, prompts).logits

    @torch.no_grad()
    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-logit features of the bare frozen backbone (what DRS measures tasks with)."""
        with self.adapters_disabled():
            return self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)

    # -- parameters ----------------------------------------------------------------------------
    def _adapters(self) -> Iterator[Any]:
        for layer in self.adapted.values():
            yield from layer.adapters.values()

    def _set_trainable(self, bases: bool, prompts: bool) -> None:
        for adapter in self._adapters():
            adapter.lora_A.requires_grad_(bases)
            adapter.lora_B.requires_grad_(bases)
        if self.prompt_bank is not None:
            self.prompt_bank.prompts.requires_grad_(prompts)
            self.prompt_bank.keys.requires_grad_(prompts)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def adapter_parameter_count(self) -> int:
        """Bases, folded cores, prompt bank and keys: the part whose size never depends on tasks."""
        return sum(
            t.numel()
            for name, t in self.adapter_tensors().items()
            if name.startswith(("adapter.", "prompts.bank", "prompts.keys"))
        )

    @property
    def adapted_matrix_count(self) -> int:
        return sum(len(layer.adapters) for layer in self.adapted.values())

    # -- continual learning --------------------------------------------------------------------
    def begin_task(
        self,
        name: str,
        kind: TaskKind,
        classes: Sequence[str],
        complexity: float,
        novelty: float,
        generator: torch.Generator | None = None,
    ) -> tuple[str, ...]:
        """Prepare to learn a task; returns the classes it adds to the head."""
        if self._task is not None:
            raise AdapterStateError(f"task {self._task.name!r} is still in progress")
        if any(layer.merged for layer in self.adapted.values()):
            raise AdapterStateError("unmerge the adapters before training")
        if kind not in ("class", "domain"):
            raise TaskError(f"task kind must be 'class' or 'domain', got {kind!r}")
        if not name or any(t.name == name for t in self.tasks):
            raise TaskError(f"task name {name!r} is empty or already learned")
        classes = tuple(classes)
        if not classes or len(set(classes)) != len(classes):
            raise TaskError(f"task {name!r} needs a non-empty list of distinct classes")
        first = not self.tasks
        new_classes = tuple(self.head.begin_task(name, classes, kind, train_old_rows=(kind == "domain")))
        for adapter in self._adapters():
            adapter.begin_task(first, generator)
        train_bases = first or self.config.adapter.train_bases == "every_task"
        self._set_trainable(bases=train_bases, prompts=True)
        self.rank_selector.begin_task(complexity, novelty)
        if self.prompt_bank is not None:
            self.prompt_bank.begin_task()
        self._task = _TaskInProgress(name, kind, classes, new_classes, complexity, novelty)
        return new_classes

    def current_task(self) -> _TaskInProgress:
        if self._task is None:
            raise AdapterStateError("no task in progress")
        return self._task

    def regularization(self) -> torch.Tensor:
        """Drift penalty on the prompt bank plus the expected-rank penalty."""
        loss = self.head.trainable_weight.new_zeros(())
        if self.prompt_bank is not None:
            loss = loss + self.prompt_bank.drift_penalty()
        if self.rank_selector.enabled and self._task is not None:
            loss = loss + self.rank_selector.rank_penalty()
        return loss

    def training_logit_mask(self) -> torch.Tensor:
        """True for logits the current task's loss may use: earlier tasks' classes are masked out
        of class-incremental tasks, as InfLoRA and CODA-Prompt do."""
        task = self.current_task()
        if task.kind == "domain":
            return torch.ones(self.head.num_classes, dtype=torch.bool)
        allowed = set(task.classes)
        return torch.tensor([label in allowed for label in self.head.labels], dtype=torch.bool)

    def end_task(self, feature_mean: torch.Tensor) -> TaskRecord:
        """Fix the rank, fold the task into the core, freeze everything it trained."""
        task = self.current_task()
        rank = self.rank_selector.end_task() if self.rank_selector.enabled else self.config.adapter.rank
        hard_gate = self.rank_selector.hard_gate(rank) if self.rank_selector.enabled else None
        for adapter in self._adapters():
            adapter.fold(hard_gate)
        self._set_trainable(bases=False, prompts=False)
        self.head.consolidate()
        self.gate.value = None
        mean = feature_mean.detach().to(self.task_feature_means).reshape(1, -1)
        self.task_feature_means = torch.cat([self.task_feature_means, mean])
        record = TaskRecord(
            name=task.name,
            kind=task.kind,
            classes=task.classes,
            new_classes=task.new_classes,
            rank=rank,
            complexity=task.complexity,
            novelty=task.novelty,
        )
        self.tasks.append(record)
        self._task = None
        return record

    def set_task_key(self, name: str, key: torch.Tensor) -> None:
        if self.prompt_bank is not None:
            self.prompt_bank.record_task(name, key)

    # -- merge ---------------------------------------------------------------------------------
    def merge(self) -> None:
        if self._task is not None:
            raise AdapterStateError("cannot merge while a task is in progress")
        for layer in self.adapted.values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.adapted.values():
            layer.unmerge()

    # -- adapter state -------------------------------------------------------------------------
    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a snapshot needs, by stable name (no task may be in progress)."""
        if self._task is not None:
            raise AdapterStateError("cannot export the adapter while a task is in progress")
        out: dict[str, torch.Tensor] = {}
        for module_name, layer in self.adapted.items():
            for part, adapter in layer.adapters.items():
                prefix = f"adapter.{module_name}.{part}"
                out[f"{prefix}.lora_A"] = adapter.lora_A.detach()
                out[f"{prefix}.lora_B"] = adapter.lora_B.detach()
                out[f"{prefix}.core"] = adapter.core.detach()
        if self.prompt_bank is not None:
            out["prompts.bank"] = self.prompt_bank.prompts.detach()
            out["prompts.keys"] = self.prompt_bank.keys.detach()
            out["prompts.task_keys"] = self.prompt_bank.task_keys.detach()
        out["tasks.feature_means"] = self.task_feature_means.detach()
        out["head.weight"] = self.head.weight.detach()
        out["head.bias"] = self.head.bias.detach()
        return {k: v.contiguous().cpu() for k, v in out.items()}

    def expected_tensor_shapes(self, num_classes: int, num_tasks: int) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for module_name, layer in self.adapted.items():
            for part, adapter in layer.adapters.items():
                prefix = f"adapter.{module_name}.{part}"
                shapes[f"{prefix}.lora_A"] = tuple(adapter.lora_A.shape)
                shapes[f"{prefix}.lora_B"] = tuple(adapter.lora_B.shape)
                shapes[f"{prefix}.core"] = tuple(adapter.core.shape)
        if self.prompt_bank is not None:
            shapes["prompts.bank"] = tuple(self.prompt_bank.prompts.shape)
            shapes["prompts.keys"] = tuple(self.prompt_bank.keys.shape)
            shapes["prompts.task_keys"] = (num_tasks, self.embed_dim)
        shapes["tasks.feature_means"] = (num_tasks, self.embed_dim)
        shapes["head.weight"] = (num_classes, self.embed_dim)
        shapes["head.bias"] = (num_classes,)
        return shapes

    def load_adapter_state(
        self,
        tensors: dict[str, torch.Tensor],
        tasks: Sequence[TaskRecord],
        labels: Sequence[str],
        label_tasks: Sequence[str],
    ) -> None:
        """Replace the whole adapter state. Callers validate shapes first (see snapshot.read_snapshot)."""
        if self._task is not None:
            raise AdapterStateError("cannot load an adapter while a task is in progress")
        expected = self.expected_tensor_shapes(len(labels), len(tasks))
        if set(tensors) != set(expected) or any(tuple(tensors[k].shape) != s for k, s in expected.items()):
            raise ConfigError("adapter tensors do not match this model's layout")
        self.unmerge()
        device = self.device
        with torch.no_grad():
            for module_name, layer in self.adapted.items():
                for part, adapter in layer.adapters.items():
                    prefix = f"adapter.{module_name}.{part}"
                    adapter.lora_A.copy_(tensors[f"{prefix}.lora_A"])
                    adapter.lora_B.copy_(tensors[f"{prefix}.lora_B"])
                    adapter.core.copy_(tensors[f"{prefix}.core"])
            if self.prompt_bank is not None:
                self.prompt_bank.prompts.copy_(tensors["prompts.bank"])
                self.prompt_bank.keys.copy_(tensors["prompts.keys"])
                self.prompt_bank.task_keys = tensors["prompts.task_keys"].clone().to(device)
                self.prompt_bank.task_names = [t.name for t in tasks]
        self.task_feature_means = tensors["tasks.feature_means"].clone().to(device)
        self.head.load(
            tensors["head.weight"].to(device),
            tensors["head.bias"].to(device),
            list(labels),
            list(label_tasks),
        )
        self.tasks = list(tasks)
