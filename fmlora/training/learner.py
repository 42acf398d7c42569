"""Learning one task at a time: measure it, train it, fold it, report it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from fmlora.data.images import ImageSource, TaskData
from fmlora.data.loader import LoaderConfig, image_batches
from fmlora.data.views import random_resized_views
from fmlora.errors import DataError
from fmlora.model.model import FMLoRAModel, TaskRecord
from fmlora.model.rank_selector import task_complexity, task_novelty

from .config import TrainConfig
from .drift import compensate_drift, fit_affine_drift
from .metrics import AccuracyMatrix
from .objectives import LinearObjective, Objective, PrototypeObjective, class_means
from .statistics import ClassStatistics, ncm_logits

__all__ = [
    "Learner",
    "TaskReport",
    "TrainingProgress",
    "collect_features",
    "evaluate",
    "fold_in_held_out",
    "new_statistics",
    "within_task_error",
]


@dataclass(frozen=True)
class TrainingProgress:
    task: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float


class TaskReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    task: TaskRecord
    epochs: int
    steps: int
    final_loss: float
    seconds: float
    trainable_parameters: int
    prior_expected_rank: float
    # How far training moved the task's own features (mean displacement / mean norm), and whether
    # earlier classes' statistics were moved with them; None where the head keeps no statistics.
    feature_drift: float | None = None
    drift_compensated: bool = False
    # Nearest-class-mean error of the task's own classes under the model before it ("auto"
    # plasticity), and whether that made the task novel (full plasticity); None where not measured.
    pre_task_error: float | None = None
    novel: bool | None = None
    # The ridge head's λ (relative to the mean diagonal of its Gram matrix); None with a linear head.
    relative_lambda: float | None = None
    # Extra views of each training image that joined the class statistics (TrainConfig.statistics_views).
    views: int = 0


ProgressCallback = Callable[[TrainingProgress], None]


def _autocast(config: TrainConfig, device: torch.device) -> Any:
    if config.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, config.autocast_dtype))


def _reader(config: TrainConfig, device: torch.device, augment: bool = False) -> LoaderConfig:
    return LoaderConfig(
        workers=config.loader_workers,
        prefetch=config.prefetch_batches,
        augment=augment,
        pin_memory=device.type == "cuda",
    )


@torch.no_grad()
def collect_features(
    model: FMLoRAModel,
    data: ImageSource,
    batch_size: int,
    fn: Callable[[torch.Tensor], torch.Tensor],
    workers: int = 0,
) -> torch.Tensor:
    loader = LoaderConfig(workers=workers)
    out = [
        fn(model.preprocessor(x).to(model.device)).float().cpu()
        for x, _ in image_batches(data, batch_size, loader=loader)
    ]
    return torch.cat(out)


@torch.no_grad()
def evaluate(
    model: FMLoRAModel, data: ImageSource, prompts: Any = "auto", batch_size: int = 128, workers: int = 0
) -> float:
    """Top-1 accuracy over all classes the model knows (no task id given)."""
    model.eval()
    head_index = torch.tensor([model.head.index_of(c) for c in data.classes], dtype=torch.long)
    correct = 0
    for x, y in image_batches(data, batch_size, loader=LoaderConfig(workers=workers)):
        logits = model(model.preprocessor(x).to(model.device), prompts)
        correct += int((logits.argmax(dim=-1).cpu() == head_index[y]).sum())
    return correct / len(data)


@torch.no_grad()
def _features_and_queries(
    model: FMLoRAModel, data: ImageSource, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pre-logit features and (with a prompt bank) prompt queries of ``data``, in one pass."""
    features, queries = [], []
    for x, _ in image_batches(data, cfg.eval_batch_size, loader=LoaderConfig(workers=cfg.loader_workers)):
        out = model.forward_detailed(model.preprocessor(x).to(model.device))
        features.append(out.features.float().cpu())
        if out.query is not None:
            queries.append(out.query.float().cpu())
    return torch.cat(features), (torch.cat(queries) if queries else None)


@torch.no_grad()
def _view_features(model: FMLoRAModel, data: ImageSource, cfg: TrainConfig, seed: int) -> torch.Tensor:
    """Pre-logit features of ``cfg.statistics_views`` random resized crops of every image: (images, views, features)."""
    generator = torch.Generator().manual_seed(seed)
    features = []
    for x, _ in image_batches(data, cfg.eval_batch_size, loader=LoaderConfig(workers=cfg.loader_workers)):
        pixels = model.preprocessor(x)
        batch = []
        for _ in range(cfg.statistics_views):
            views = random_resized_views(pixels, generator, cfg.view_scale).to(model.device)
            batch.append(model.forward_detailed(views).features.float().cpu())
        features.append(torch.stack(batch, dim=1))
    return torch.cat(features)


def _familiar(before: torch.Tensor, task: TaskData, cfg: TrainConfig) -> bool:
    """Whether the features before the task separate its classes well enough for views (TrainConfig)."""
    if cfg.views_max_task_error is None:
        return True
    return within_task_error(before, task.train.labels, len(task.classes)) < cfg.views_max_task_error


def within_task_error(features: torch.Tensor, labels: torch.Tensor, classes: int) -> float:
    """Error of a cosine nearest class mean over the task's own classes, on its own images: how
    badly the current features separate what the task has to learn."""
    means = class_means(features, labels, classes)
    predicted = ncm_logits(features, means).argmax(dim=1)
    return float((predicted != labels).double().mean())


@torch.no_grad()
def fold_in_held_out(
    model: FMLoRAModel,
    statistics: ClassStatistics,
    held_out: ClassStatistics,
    images: ImageSource,
    relative_lambda: float,
    batch_size: int = 128,
    workers: int = 0,
) -> None:
    """Add ``images`` (of classes the model knows, kept out of training and of λ's choice: the
    worker's gate images) to ``held_out``, then solve ``model``'s head from ``statistics`` and
    ``held_out`` together at ``relative_lambda``. ``statistics`` itself is left as it is, so the
    next task's λ and training, and every later gate, see only the training images."""
    model.eval()
    features = collect_features(model, images, batch_size, lambda x: model.forward_detailed(x).features, workers)
    trial = held_out.copy()
    trial.add(features, images.labels, images.classes)
    merged = statistics.merged(trial)
    weight = merged.solve(relative_lambda)
    model.head.set_rows(weight.T[[merged.labels.index(label) for label in model.head.labels]])
    held_out.replace_with(trial)


def new_statistics(model: FMLoRAModel) -> ClassStatistics:
    """Empty class statistics for ``model``'s ridge head (its random features, its feature size)."""
    return ClassStatistics(model.embed_dim, model.head.feature_map)


class Learner:
    def __init__(self, config: TrainConfig | None = None):
        self.config = config or TrainConfig()

    def learn_task(
        self,
        model: FMLoRAModel,
        task: TaskData,
        progress: ProgressCallback | None = None,
        statistics: ClassStatistics | None = None,
        held_out: ClassStatistics | None = None,
        frozen_features: torch.Tensor | None = None,
    ) -> TaskReport:
        """Train ``model`` on ``task`` and fold it in; the model is then ready to serve or save.

        A ridge head is solved from ``statistics`` (required then), to which the task's class
        statistics are added: on failure neither the model nor the statistics change.

        ``held_out``: statistics of images kept out of training and of λ's choice (the worker's
        gate images, which join the served head once the gate has passed): never solved from here,
        but moved with ``statistics`` when the task's training moves the features.

        ``frozen_features``: the bare frozen backbone's features of ``task.train`` (``collect_features``
        with ``model.backbone_features``), when the caller has them already.
        """
        cfg = self.config
        started = time.perf_counter()
        device = torch.device(cfg.device)
        model.to(device)
        # One private generator drives shuffling, factor/head init and Gumbel noise: runs are
        # reproducible without touching the process-global RNG (which a server shares).
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + len(model.tasks))

        model.eval()
        features = frozen_features
        if features is None:
            features = collect_features(
                model, task.train, cfg.eval_batch_size, model.backbone_features, cfg.loader_workers
            )
        elif features.shape[0] != len(task.train):
            raise DataError(f"expected frozen features of {len(task.train)} images, got {features.shape[0]}")
        complexity = task_complexity(features)
        novelty = task_novelty(features.mean(0), model.task_feature_means.cpu())
        ridge = model.head.feature_map is not None
        if ridge and statistics is None:
            raise DataError("a model with a ridge head learns with class statistics (learn_stream keeps them)")
        model.begin_task(task.name, task.kind, task.classes, complexity, novelty, generator=generator)
        trial = statistics.copy() if statistics is not None else None
        held_out_trial = held_out.copy() if held_out is not None else None
        try:
            report = self._train_and_fold(model, task, features, generator, started, progress, trial, held_out_trial)
        except BaseException:
            model.abort_task()  # a failed or interrupted task leaves no trace
            raise
        if statistics is not None and trial is not None:
            statistics.replace_with(trial)
        if held_out is not None and held_out_trial is not None:
            held_out.replace_with(held_out_trial)
        return report

    def _train_and_fold(
        self,
        model: FMLoRAModel,
        task: TaskData,
        features: torch.Tensor,
        generator: torch.Generator,
        started: float,
        progress: ProgressCallback | None,
        statistics: ClassStatistics | None,
        held_out: ClassStatistics | None = None,
    ) -> TaskReport:
        cfg = self.config
        device = model.device
        prior_rank = model.rank_selector.expected_rank()
        first = len(model.tasks) == 0
        adapt = cfg.adaptation in ("continual", "on_demand") or (cfg.adaptation == "first_task" and first)
        on_demand = cfg.adaptation == "on_demand"
        lr = cfg.lr * (1.0 if first else cfg.later_lr_scale)

        objective: Objective
        head = {id(p) for p in model.head.parameters()}
        before, before_queries = None, None
        pre_task_error, novel = None, None
        if statistics is None:
            objective = LinearObjective(model, task.classes, cfg)
            params = model.trainable_parameters()
        else:
            model.eval()
            # With the prompt queries of the same pass: a task that trains nothing needs no second one.
            before, before_queries = _features_and_queries(model, task.train, cfg)
            objective = PrototypeObjective(task.classes, task.train.labels, before, statistics, cfg, device)
            if adapt and not first and (cfg.plasticity == "auto" or on_demand):
                pre_task_error = within_task_error(before, task.train.labels, len(task.classes))
                novel = pre_task_error >= cfg.novel_task_error
                if novel and cfg.plasticity == "auto":
                    lr = cfg.lr * cfg.novel_lr_scale
                    if cfg.novel_open_bases:
                        model.open_bases()
                elif not novel and on_demand and task.kind != "domain":
                    # Features that already separate a task's new classes are left as they are: the
                    # task only adds class statistics, and earlier classes do not drift. A domain
                    # task (known classes, new images) always adapts: measured, that pays (README).
                    adapt = False
            # The ridge head's rows are solved after training, never trained.
            params = [p for p in model.trainable_parameters() if id(p) not in head] if adapt else []
        extra = objective.parameters() if adapt else []
        groups = [
            {"params": [p for p in params if id(p) not in head], "lr": lr},
            {"params": [p for p in params if id(p) in head] + extra, "lr": lr * cfg.head_lr_scale},
        ]
        trained = [p for g in groups for p in g["params"]]
        step, loss_value = self._optimise(model, task, objective, groups, generator, progress) if trained else (0, 0.0)

        model.eval()
        # One pass after training gives both the task's prompt key and its features for the head.
        if trained or before is None:
            needs_pass = statistics is not None or model.prompt_bank is not None
            after, queries = _features_and_queries(model, task.train, cfg) if needs_pass else (before, None)
        else:  # nothing trained: the model is the one the features before were taken with
            after, queries = before, before_queries
        task_key = queries.mean(0) if queries is not None else None
        # Solved before the task ends (in eval mode the live factors give the folded outputs), so a
        # failure still rolls the task back; only assigning the rows is left for after.
        solution, drift_size, compensated = None, None, False
        views: torch.Tensor | None = None
        if statistics is not None and before is not None and after is not None:
            salt = cfg.seed * 1009 + len(model.tasks)
            drift = fit_affine_drift(before, after, cfg.drift_ridge)
            drift_size = drift.relative_size(before)
            if trained and cfg.drift_compensation == "affine" and statistics.labels:
                compensate_drift(statistics, drift, samples_per_class=cfg.drift_samples, seed=salt)
                if held_out is not None:
                    compensate_drift(held_out, drift, samples_per_class=cfg.drift_samples, seed=salt + 1)
                compensated = True
            if cfg.statistics_views and _familiar(before, task, cfg):
                views = _view_features(model, task.train, cfg, salt)
            solution = statistics.add_task(
                after,
                task.train.labels,
                task.classes,
                seed=salt,
                selection=cfg.lambda_selection,
                scoring_features=cfg.lambda_scoring_features,
                tolerance=cfg.lambda_tolerance,
                old_class_samples=cfg.lambda_old_class_samples,
                smoothing=cfg.lambda_smoothing,
                scoring=cfg.lambda_scoring,
                views=views,
                view_weighting=cfg.view_weighting,
            )
        record = model.end_task(features.mean(0), task_key)
        if solution is not None and statistics is not None:
            order = [statistics.labels.index(label) for label in model.head.labels]
            model.head.set_rows(solution.weight.T[order])
        return TaskReport(
            task=record,
            epochs=cfg.epochs if trained else 0,
            steps=step,
            final_loss=loss_value,
            seconds=time.perf_counter() - started,
            trainable_parameters=sum(p.numel() for p in trained),
            prior_expected_rank=prior_rank,
            feature_drift=drift_size,
            drift_compensated=compensated,
            pre_task_error=pre_task_error,
            views=0 if views is None else int(views.shape[1]),
            novel=novel,
            relative_lambda=None if solution is None else solution.relative_lambda,
        )

    def _optimise(
        self,
        model: FMLoRAModel,
        task: TaskData,
        objective: Objective,
        groups: list[dict[str, Any]],
        generator: torch.Generator,
        progress: ProgressCallback | None,
    ) -> tuple[int, float]:
        """The task's optimisation loop; returns (steps, last loss)."""
        cfg = self.config
        device = model.device
        optimizer_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        optimizer = optimizer_cls(
            [g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        steps_per_epoch = math.ceil(len(task.train) / cfg.batch_size)
        total = steps_per_epoch * cfg.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_lambda(total))

        step, loss_value = 0, float("nan")
        bar = tqdm(total=total, desc=f"task {task.name}", disable=None if cfg.progress_bar else True, leave=False)
        try:
            for epoch in range(cfg.epochs):
                model.train()
                # Batches carry each image's position in the task, for per-image targets (distillation).
                for images, index in image_batches(
                    task.train,
                    cfg.batch_size,
                    loader=_reader(cfg, device, augment=cfg.augment),
                    data_config=model.preprocessor.data_config,
                    shuffle=True,
                    generator=generator,
                    positions=True,
                ):
                    model.rank_selector.anneal(step / max(1, total - 1))
                    x = model.preprocessor(images).to(device)
                    with _autocast(cfg, device):
                        loss = objective.loss(model, x, index, task.train.labels[index])
                    loss = loss.float() + model.regularization()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    loss_value = float(loss.detach())
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss_value:.3f}")
                    if progress is not None:
                        progress(TrainingProgress(task.name, epoch + 1, cfg.epochs, step, total, loss_value))
        finally:
            bar.close()
        return step, loss_value

    def _lr_lambda(self, total: int) -> Callable[[int], float]:
        warmup = int(self.config.warmup_fraction * total)
        floor = self.config.min_lr_fraction

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return factor

    def learn_stream(
        self,
        model: FMLoRAModel,
        tasks: Sequence[TaskData],
        progress: ProgressCallback | None = None,
        on_task_end: Callable[[int, TaskReport, AccuracyMatrix], None] | None = None,
        held_out: Sequence[ImageSource] | None = None,
    ) -> tuple[AccuracyMatrix, list[TaskReport]]:
        """Learn tasks in order; after each, evaluate every task seen so far (one accuracy-matrix row).

        ``held_out`` (one per task, with a ridge head): images of each task kept out of its training
        that join the head once it is learned (``fold_in_held_out``), as the worker's gate images do
        once its candidate passes the gate."""
        matrix = AccuracyMatrix()
        reports: list[TaskReport] = []
        statistics = new_statistics(model) if model.head.feature_map is not None else None
        if held_out is not None and (statistics is None or len(held_out) != len(tasks)):
            raise DataError("held-out images to fold in need a ridge head and one set per task")
        folded = new_statistics(model) if held_out is not None else None
        for t, task in enumerate(tasks):
            report = self.learn_task(model, task, progress, statistics, folded)
            if held_out is not None and statistics is not None and folded is not None:
                if report.relative_lambda is None:
                    raise DataError("a ridge head's task report carries its λ")
                batch, workers = self.config.eval_batch_size, self.config.loader_workers
                fold_in_held_out(model, statistics, folded, held_out[t], report.relative_lambda, batch, workers)
            reports.append(report)
            seen = tasks[: t + 1]
            row = [
                evaluate(model, s.test, batch_size=self.config.eval_batch_size, workers=self.config.loader_workers)
                for s in seen
            ]
            matrix.add_row(row, [len(s.test) for s in seen])
            if on_task_end is not None:
                on_task_end(t, report, matrix)
        return matrix, reports
