"""FMLoRAModel: a frozen timm ViT with F-LoRA layers, the rank selector, meta-prompts and a head."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from fmlora.errors import AdapterStateError, DataError, PromptError, TaskError, UnknownTaskError

from .backbone import Preprocessor, create_backbone, weights_fingerprint
from .config import ModelConfig
from .head import IncrementalHead, RandomFeatures
from .layers import AdaptedLinear, AdapterRuntime, inject_adapters
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
        self.preprocessor = Preprocessor.for_model(
            backbone, config.backbone.data_config_overrides, config.backbone.input_norm
        )
        self.embed_dim = int(backbone.num_features)
        self.depth = len(backbone.blocks)
        first_attn = backbone.blocks[0].attn
        attn_dim = int(first_attn.qkv.out_features // 3) if hasattr(first_attn, "qkv") else self.embed_dim
        self.has_class_token = getattr(backbone, "cls_token", None) is not None

        self.runtime = AdapterRuntime()
        self.adapted: dict[str, AdaptedLinear] = inject_adapters(backbone, config.adapter, self.runtime)
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
        feature_map = None
        if config.head.kind == "ridge":
            feature_map = RandomFeatures(self.embed_dim, config.head.random_features, config.head.projection_seed)
        self.head = IncrementalHead(
            self.embed_dim, config.head_init_std, feature_map, solved_row_dtype=config.head.solved_row_dtype
        )
        self.register_buffer("task_feature_means", torch.zeros(0, self.embed_dim))
        self.tasks: list[TaskRecord] = []
        self._task: _TaskInProgress | None = None
        self._rollback: dict[str, Any] | None = None
        self._set_trainable(bases=False, prompts=False)

    # -- modes ---------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FMLoRAModel:
        # The frozen backbone always runs as in eval (no dropout/drop-path), as the protocol fixes;
        # training mode only turns on the rank selector's Gumbel noise.
        super().train(mode)
        self.backbone.eval()
        return self

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The bare backbone in this thread: no F-LoRA update and no meta-prompts."""
        previous = self.runtime.bare
        self.runtime.bare = True
        try:
            yield
        finally:
            self.runtime.bare = previous

    @contextmanager
    def prompts_disabled(self) -> Iterator[None]:
        """Adapters on, meta-prompts off, in this thread (the prompt-free forward)."""
        previous = self.runtime.get("prompts_off", False)
        self.runtime.set("prompts_off", True)
        try:
            yield
        finally:
            self.runtime.set("prompts_off", previous)

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
        elif isinstance(prompts, (list, tuple)):
            choices = [PromptChoice.parse(p) for p in prompts]
            if len(choices) != batch:
                raise PromptError(f"{len(choices)} prompt choices for a batch of {batch}")
        else:
            raise PromptError(f"prompts must be one choice or a list of choices, got {type(prompts).__name__}")
        if self.prompt_bank is not None:
            self.prompt_bank.validate_choices(choices)
        else:
            known = {t.name for t in self.tasks}
            for choice in choices:
                if choice.mode == "task" and choice.task not in known:
                    raise UnknownTaskError(f"unknown task {choice.task!r} for prompt selection")
        return choices

    def _update_gate(self) -> None:
        if self._task is None or not self.rank_selector.enabled:
            self.runtime.gate = None
        elif self.training:
            self.runtime.gate = self.rank_selector.sample_gate()
        else:
            self.runtime.gate = self.rank_selector.hard_gate()

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        size = self.preprocessor.input_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != size:
            raise DataError(
                f"expected preprocessed images of shape (N, 3, {size[0]}, {size[1]}), got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise DataError(f"expected float images (use model.preprocessor on uint8 images), got {images.dtype}")
        if images.shape[0] == 0:
            raise DataError("empty batch")
        weight_dtype = self.head.frozen_weight.dtype
        # A model cast to bf16/fp16 takes float32 input from the preprocessor; autocast needs no cast.
        return images if torch.is_autocast_enabled() else images.to(weight_dtype)

    def forward_detailed(self, images: torch.Tensor, prompts: Any = None) -> ModelOutput:
        """Logits plus the meta-prompt each input used. ``images`` are preprocessed float tensors.

        ``prompts``: one choice for the whole batch ('auto', 'none', {'task': NAME}) or one per input.
        """
        images = self._check_images(images)
        batch = images.shape[0]
        choices = self._choices(prompts, batch)
        prompts_off = self.runtime.bare or self.runtime.get("prompts_off", False)
        bank = None if prompts_off else self.prompt_bank
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

    def open_bases(self) -> None:
        """Let the shared bases A, B train in the task in progress too (for a task far from what
        they cover); ``abort_task`` still restores them."""
        self.current_task()
        self._set_trainable(bases=True, prompts=True)

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
        self._rollback = {
            "bases": [(a.lora_A.detach().clone(), a.lora_B.detach().clone()) for a in self._adapters()],
            "head": self.head.state(),
            "rank_logits": self.rank_selector.logits.detach().clone(),
            "bank": None
            if self.prompt_bank is None
            else (self.prompt_bank.prompts.detach().clone(), self.prompt_bank.keys.detach().clone()),
        }
        new_classes = tuple(
            self.head.begin_task(name, classes, kind, train_old_rows=(kind == "domain"), generator=generator)
        )
        for adapter in self._adapters():
            adapter.begin_task(first, generator)
        train_bases = first or self.config.adapter.train_bases == "every_task"
        self._set_trainable(bases=train_bases, prompts=True)
        self.rank_selector.begin_task(complexity, novelty, generator)
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

    def end_task(self, feature_mean: torch.Tensor, task_key: torch.Tensor | None = None) -> TaskRecord:
        """Fix the rank, fold the task into the core, freeze everything it trained.

        ``task_key``: the mean meta-prompt query of the task's data (required when prompts are on),
        measured in eval mode before folding, which leaves outputs unchanged.
        """
        task = self.current_task()
        if self.prompt_bank is not None and task_key is None:
            raise AdapterStateError("a model with meta-prompts needs the task's key to end the task")
        if feature_mean.numel() != self.embed_dim or (task_key is not None and task_key.numel() != self.embed_dim):
            raise TaskError(f"task feature mean and key need {self.embed_dim} values each")
        rank = self.rank_selector.end_task() if self.rank_selector.enabled else self.config.adapter.rank
        hard_gate = self.rank_selector.hard_gate(rank) if self.rank_selector.enabled else None
        for adapter in self._adapters():
            adapter.fold(hard_gate)
        self._set_trainable(bases=False, prompts=False)
        self.head.consolidate()
        self.runtime.gate = None
        if self.prompt_bank is not None and task_key is not None:
            self.prompt_bank.record_task(task.name, task_key)
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
        self._rollback = None
        return record

    def abort_task(self) -> None:
        """Undo a task that failed mid-way: the model is exactly as before ``begin_task``."""
        if self._task is None or self._rollback is None:
            raise AdapterStateError("no task in progress")
        saved = self._rollback
        with torch.no_grad():
            for adapter, (a, b) in zip(self._adapters(), saved["bases"], strict=True):
                adapter.lora_A.copy_(a)
                adapter.lora_B.copy_(b)
                adapter.factor_M = None
                adapter.factor_N = None
            self.rank_selector.logits.copy_(saved["rank_logits"])
            if self.prompt_bank is not None and saved["bank"] is not None:
                self.prompt_bank.prompts.copy_(saved["bank"][0])
                self.prompt_bank.keys.copy_(saved["bank"][1])
        self.head.load(*saved["head"])
        self.rank_selector.abort_task()
        self._set_trainable(bases=False, prompts=False)
        self.runtime.gate = None
        self._task = None
        self._rollback = None

    # -- merge ---------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in self.adapted.values())

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
        if self.prompt_bank is not None and self.prompt_bank.task_names != [t.name for t in self.tasks]:
            raise AdapterStateError("task keys and learned tasks disagree; end tasks with end_task(…, task_key)")
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
        out["head.weight"] = self.head.publishable_weight()
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
        shapes["head.weight"] = (num_classes, self.head.row_features)
        shapes["head.bias"] = (num_classes,)
        return shapes

    def load_adapter_state(
        self,
        tensors: dict[str, torch.Tensor],
        tasks: Sequence[TaskRecord],
        labels: Sequence[str],
        label_tasks: Sequence[str],
    ) -> None:
        """Replace the whole adapter state. Callers validate first (see snapshot.check_compatible).

        Every tensor is staged on the model's device and dtype before anything is assigned, so a
        failure (e.g. out of memory) leaves the model as it was. A merged model is re-merged.
        """
        if self._task is not None:
            raise AdapterStateError("cannot load an adapter while a task is in progress")
        expected = self.expected_tensor_shapes(len(labels), len(tasks))
        if set(tensors) != set(expected) or any(tuple(tensors[k].shape) != s for k, s in expected.items()):
            raise DataError("adapter tensors do not match this model's layout")
        dtype = self.head.frozen_weight.dtype
        staged = {k: v.to(device=self.device, dtype=dtype, copy=True) for k, v in tensors.items()}
        was_merged = self.merged
        self.unmerge()
        with torch.no_grad():
            for module_name, layer in self.adapted.items():
                for part, adapter in layer.adapters.items():
                    prefix = f"adapter.{module_name}.{part}"
                    adapter.lora_A.copy_(staged[f"{prefix}.lora_A"])
                    adapter.lora_B.copy_(staged[f"{prefix}.lora_B"])
                    adapter.core.copy_(staged[f"{prefix}.core"])
            if self.prompt_bank is not None:
                self.prompt_bank.prompts.copy_(staged["prompts.bank"])
                self.prompt_bank.keys.copy_(staged["prompts.keys"])
                self.prompt_bank.task_keys = staged["prompts.task_keys"]
                self.prompt_bank.task_names = [t.name for t in tasks]
        self.task_feature_means = staged["tasks.feature_means"]
        self.head.load(staged["head.weight"], staged["head.bias"], list(labels), list(label_tasks))
        self.tasks = list(tasks)
        if was_merged:
            self.merge()
