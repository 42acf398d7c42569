"""The training worker: claim queued tasks under a lease, learn them, gate them, publish snapshots.

One worker trains at a time per registry: it holds the ``worker`` lease (renewed by a heartbeat
thread) for as long as it runs, and every write that matters (progress, publishing) checks the lease
in the same transaction. Any number of others may run as standbys: they poll for the lease. A worker
that is killed leaves its lease to expire; the next holder runs ``Registry.recover()``, which
requeues the task it left and removes any snapshot objects it did not record, so the task completes
exactly once and version numbers (reserved in the database) stay strictly increasing.

Each task starts from the live version: its snapshot and its worker state (``WorkerState``, e.g.
class statistics), which ``_train`` may update and which is published with the new version.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fmlora.data.images import FileImageSet, ImageSet, ImageSource, TaskData
from fmlora.errors import DataError, FmloraError, LeaseError, RegistryUnavailableError, StoreUnavailableError
from fmlora.model.model import FMLoRAModel
from fmlora.model.snapshot import load_snapshot
from fmlora.registry.artifacts import read_task_files
from fmlora.registry.publish import publish_version
from fmlora.registry.records import WORKER_LEASE, TaskInfo, VersionInfo
from fmlora.registry.registry import Registry
from fmlora.registry.worker_state import WorkerState
from fmlora.training.config import TrainConfig
from fmlora.training.learner import (
    Learner,
    TaskReport,
    TrainingProgress,
    collect_features,
    evaluate,
    fold_in_held_out,
)
from fmlora.training.metrics import AccuracyMatrix
from fmlora.training.statistics import ncm_logits

from .gate import GateConfig
from .state import ClassState, pack_state, unpack_state

__all__ = ["GateConfig", "Worker", "WorkerConfig"]

log = logging.getLogger("fmlora.worker.worker")


@dataclass(frozen=True)
class WorkerConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    lease_ttl_s: float = 30.0
    heartbeat_s: float = 5.0
    poll_interval_s: float = 1.0
    progress_interval_s: float = 1.0
    # Decoded training images up to this size are held in memory; larger tasks are read from disk.
    max_cached_bytes: int = 2 * 2**30
    keep_versions: int | None = None  # retention: non-live versions kept after each publish (None = all)
    # Once a candidate passes the gate, its task's held-out images (a fifth of the upload) join the
    # served head's statistics: the head learns from all the user's images, and the gates stay
    # honest (fmlora/worker/state.py). False: the served head is the one the gate scored.
    fold_in_held_out: bool = True


class _Abandon(Exception):
    """Raised inside training to stop it: the worker was told to stop or lost its lease."""


StageHook = Callable[[str, dict[str, Any]], None]


class Worker:
    """Learns queued tasks one after another; see the module docstring for the guarantees."""

    def __init__(self, registry: Registry, config: WorkerConfig | None = None, on_stage: StageHook | None = None):
        self.registry = registry
        self.config = config or WorkerConfig()
        self.id = self.config.worker_id
        self._on_stage = on_stage
        self._pristine: FMLoRAModel | None = None
        self._holding = False
        self._lease_lost = threading.Event()
        self._heartbeat_stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()
        self._stop_requested = False
        self._eval_cache: dict[str, ImageSource] = {}
        # The frozen backbone's features of each task's held-out images: they never change (the
        # backbone is frozen), so the baseline computes them once per task, not once per version.
        self._frozen_cache: dict[str, torch.Tensor] = {}
        # The class statistics of the task in hand (set by _train, read by the gate's baseline).
        self._classes: ClassState | None = None

    # -- lease ---------------------------------------------------------------------------------
    def _hold_lease(self) -> bool:
        if self._holding and not self._lease_lost.is_set():
            return True
        try:
            if not self.registry.acquire_lease(WORKER_LEASE, self.id, self.config.lease_ttl_s):
                return False
        except RegistryUnavailableError as exc:
            log.warning("cannot reach the registry to take the lease: %s", exc)
            return False
        self._stop_heartbeat()
        self._holding = True
        self._lease_lost.clear()
        for action in self.registry.recover():
            log.warning("recovered after an earlier worker: %s", action)
        self._heartbeat = threading.Thread(target=self._beat, name="fmlora-worker-heartbeat", daemon=True)
        self._heartbeat.start()
        log.info("worker %s holds the training lease", self.id)
        return True

    def _beat(self) -> None:
        while not self._heartbeat_stop.wait(self.config.heartbeat_s):
            try:
                self.registry.renew_lease(WORKER_LEASE, self.id, self.config.lease_ttl_s)
            except LeaseError:
                log.error("worker %s lost its lease; abandoning the current task", self.id)
                self._lease_lost.set()
                return
            except FmloraError as exc:  # a busy database: try again next beat, the lease has slack
                log.warning("lease renewal failed: %s", exc)

    def _stop_heartbeat(self) -> None:
        self._heartbeat_stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        self._heartbeat_stop.clear()

    def release(self) -> None:
        """Stop the heartbeat and give the lease back (the next worker may start at once)."""
        self._stop_heartbeat()
        if self._holding:
            self._holding = False
            try:
                self.registry.release_lease(WORKER_LEASE, self.id)
            except RegistryUnavailableError as exc:  # it expires by itself
                log.warning("could not release the lease: %s", exc)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def stop(self) -> None:
        """Ask the worker to stop: training abandons at its next step; the task is queued again.

        Safe in a signal handler: there it only sets a flag. Setting the Event takes its lock, which
        the main thread (the one a handler interrupts) may hold inside ``self._stop.wait``: a worker
        deadlocked that way once, its server gone. Off the main thread the Event is set too, so
        waits end at once; on it, they notice the flag within a poll interval."""
        self._stop_requested = True
        if threading.current_thread() is not threading.main_thread():
            self._stop.set()

    # -- loop ----------------------------------------------------------------------------------
    def run_forever(self, *, exit_when_idle: bool = False) -> None:
        """Train tasks until ``stop()`` (or, with ``exit_when_idle``, until the queue is empty)."""
        try:
            while not self._stop_requested:
                try:
                    if not self._hold_lease():
                        self._stop.wait(self.config.poll_interval_s)
                        continue
                    task = self.run_once()
                except (RegistryUnavailableError, StoreUnavailableError) as exc:
                    # A task may be left mid-training: take the lease anew once the registry is back,
                    # which runs recover() and requeues it (this worker's or, after expiry, another's).
                    log.error("the registry is unavailable: %s; retrying", exc)
                    self._lease_lost.set()
                    self._stop.wait(self.config.poll_interval_s)
                    continue
                if task is None:
                    if exit_when_idle:
                        return
                    self._stop.wait(self.config.poll_interval_s)
        finally:
            self.release()

    def run_once(self) -> TaskInfo | None:
        """Learn the oldest queued task if this worker holds (or can take) the lease; return its final state."""
        if not self._hold_lease():
            return None
        task = self.registry.claim_next_task(self.id)
        if task is None:
            return None
        log.info(
            "training task %s (%s, %d classes, attempt %d)", task.name, task.kind, len(task.classes), task.attempts
        )
        try:
            return self._learn(task)
        except _Abandon:
            if self._lease_lost.is_set():
                return self.registry.get_task(task.id)  # the next lease holder requeues it
            self.registry.fail_task(task.id, "the worker was stopped; the task was queued again", retry=True)
            # A requested stop is not the task's fault: give the attempt back.
            return self.registry.get_task(task.id)
        except LeaseError:
            log.error("lost the lease while working on task %s", task.name)
            return self.registry.get_task(task.id)
        except (RegistryUnavailableError, StoreUnavailableError) as exc:
            # Not the task's fault: nothing was recorded; it is retried (here or by the next lease holder).
            log.error("task %s interrupted: %s", task.name, exc)
            try:
                return self.registry.fail_task(
                    task.id, f"interrupted: {exc}; it was retried", retry=True, owner=self.id
                )
            except LeaseError:
                return self.registry.get_task(task.id)
        except FmloraError as exc:
            log.error("task %s failed: %s", task.name, exc)
            return self.registry.fail_task(task.id, str(exc), retry=False, owner=self.id)
        except Exception:
            log.exception("task %s failed unexpectedly", task.name)
            return self.registry.fail_task(
                task.id, "internal error while training; see the worker log", retry=True, owner=self.id
            )

    # -- one task ------------------------------------------------------------------------------
    def _stage(self, stage: str, **info: Any) -> None:
        if self._on_stage is not None:
            self._on_stage(stage, info)

    def _check_running(self) -> None:
        if self._stop_requested or self._lease_lost.is_set():
            raise _Abandon

    def _start_model(self) -> tuple[FMLoRAModel, VersionInfo | None, WorkerState | None]:
        """The live version's model and worker state (after a rollback: the rolled-back-to version's)."""
        if self._pristine is None:
            self._pristine = FMLoRAModel(self.registry.model_config)
        model = copy.deepcopy(self._pristine)
        live = self.registry.live()
        state = None
        if live is not None:
            load_snapshot(model, self.registry.fetch_version(live.version))
            state = self.registry.read_worker_state(live.version)
        return model, live, state

    def _image_set(self, files: list[tuple[Any, str]], classes: list[str], model: FMLoRAModel) -> ImageSource:
        if not files:
            raise DataError("a stored task has no images in one of its splits")
        position = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([position[c] for _, c in files], dtype=torch.long)
        on_disk = FileImageSet(
            tuple(p for p, _ in files),
            labels,
            tuple(classes),
            model.preprocessor.input_size,
            model.preprocessor.crop_pct,
        )
        height, width = model.preprocessor.input_size
        if len(files) * 3 * height * width > self.config.max_cached_bytes:
            return on_disk
        arrays = on_disk.fetch(torch.arange(len(files)))
        return ImageSet(arrays, labels, tuple(classes))

    def _eval_set(self, task_name: str, model: FMLoRAModel) -> ImageSource:
        if task_name not in self._eval_cache:
            stored_task = self.registry.find_task(name=task_name)
            if stored_task is None:
                raise DataError(f"task {task_name!r} is in the live model but not in the registry")
            stored = read_task_files(self.registry, stored_task.id)
            self._eval_cache[task_name] = self._image_set(stored.eval, stored.classes, model)
        return self._eval_cache[task_name]

    def _learn(self, task: TaskInfo) -> TaskInfo:
        model, parent, state = self._start_model()
        stored = read_task_files(self.registry, task.id)
        data = TaskData(
            name=task.name,
            kind=task.kind,
            train=self._image_set(stored.train, stored.classes, model),
            test=self._image_set(stored.eval, stored.classes, model),
        )
        self._eval_cache[task.name] = data.test
        self._frozen_cache.pop(task.name, None)  # a name may come back with other images
        self._stage("training", task=task.name)
        report, classes = self._train(model, data, state, task)
        self._check_running()
        self.registry.update_task(task.id, self.id, status="evaluating")
        self._stage("evaluating", task=task.name)
        card = self._evaluate(model, parent, report.model_dump(mode="json"))
        self._check_running()
        if card["gate"]["passed"] and self.config.fold_in_held_out:
            card["served_head"] = self._fold_in_held_out(model, data, classes, report.relative_lambda)
        return self._publish(model, task, parent, card, pack_state(classes))

    def _fold_in_held_out(
        self, model: FMLoRAModel, data: TaskData, classes: ClassState, relative_lambda: float | None
    ) -> dict[str, Any]:
        """The served head from the task's held-out images too (``fold_in_held_out``), at the λ chosen
        on the training images. The gate has already scored the head without them; what it
        measured stays on the card."""
        if classes.ridge is None or classes.held_out is None or relative_lambda is None:
            return {"held_out_images": 0}
        cfg = self.config.train
        fold_in_held_out(
            model, classes.ridge, classes.held_out, data.test, relative_lambda, cfg.eval_batch_size, cfg.loader_workers
        )
        return {
            "held_out_images": int(classes.held_out.counts.sum()),
            "training_images": int(classes.ridge.counts.sum()),
            "relative_lambda": relative_lambda,
        }

    def _train(
        self, model: FMLoRAModel, data: TaskData, state: WorkerState | None, task: TaskInfo
    ) -> tuple[TaskReport, ClassState]:
        """Learn ``data`` into ``model`` (starting from the parent's worker ``state``); return the
        training report and the class statistics to publish with the new version as its worker
        state: the ridge head's and the training-free baseline's (``fmlora/worker/state.py``)."""
        last_report = [0.0]

        def progress(p: TrainingProgress) -> None:
            self._check_running()
            now = time.monotonic()
            if now - last_report[0] >= self.config.progress_interval_s or p.step == p.steps:
                last_report[0] = now
                fields = {"epoch": p.epoch, "epochs": p.epochs, "step": p.step, "steps": p.steps, "loss": p.loss}
                self.registry.update_task(task.id, self.id, progress=fields)
                self._stage("progress", **fields)

        classes = unpack_state(state, model)
        cfg = self.config.train
        # The frozen backbone's features of the training images: the learner measures the task with
        # them, and the baseline's statistics are made of them.
        model.eval()
        frozen = collect_features(model, data.train, cfg.eval_batch_size, model.backbone_features, cfg.loader_workers)
        report = Learner(cfg).learn_task(model, data, progress, classes.ridge, classes.held_out, frozen)
        classes.baseline.add(frozen, data.train.labels, data.train.classes)
        self._classes = classes
        return report, classes

    def _evaluate(self, model: FMLoRAModel, parent: VersionInfo | None, report: dict[str, Any]) -> dict[str, Any]:
        names = [t.name for t in model.tasks]
        sets = [self._eval_set(name, model) for name in names]
        batch = self.config.train.eval_batch_size
        row = [evaluate(model, s, batch_size=batch) for s in sets]
        matrix = AccuracyMatrix()
        previous_rows = [] if parent is None else parent.card.get("accuracy_matrix", [])
        if [list(r) for r in previous_rows] and len(previous_rows) == len(names) - 1:
            sizes = [len(s) for s in sets]
            for t, prev in enumerate(previous_rows):
                matrix.add_row(prev, sizes[: t + 1])
        else:
            # The parent's card cannot be extended (e.g. a home made before cards existed): start anew.
            matrix = AccuracyMatrix()
            for t in range(len(names) - 1):
                matrix.add_row(row[: t + 1], [len(s) for s in sets[: t + 1]])
        matrix.add_row(row, [len(s) for s in sets])
        previous = dict(parent.card.get("accuracy", {})) if parent is not None else {}
        forgetting = {
            name: float(previous[name]) - acc
            for name, acc in zip(names[:-1], row[:-1], strict=True)
            if name in previous
        }
        overall = matrix.summary()["final_accuracy"]
        baseline = self._baseline(model, names, sets)
        reasons = self.config.gate.check(row[-1], forgetting, overall, baseline)
        keys = ("epochs", "steps", "final_loss", "seconds", "trainable_parameters")
        train = {
            k: report[k]
            for k in (*keys, "pre_task_error", "novel", "feature_drift", "drift_compensated", "relative_lambda")
        }
        train["rank"] = report["task"].get("rank")
        return {
            "task": names[-1],
            "tasks": names,
            "accuracy": dict(zip(names, row, strict=True)),
            "new_task_accuracy": row[-1],
            "forgetting_vs_parent": forgetting,
            "eval_sizes": [len(s) for s in sets],
            **matrix.summary(),
            "train": train,
            "gate": {
                "passed": not reasons,
                "reasons": reasons,
                "min_new_task_accuracy": self.config.gate.min_new_task_accuracy,
                "max_forgetting": self.config.gate.max_forgetting,
                "baseline": baseline,
                "baseline_tolerance": self.config.gate.baseline_tolerance,
            },
        }

    def _baseline(self, model: FMLoRAModel, names: list[str], sets: list[ImageSource]) -> dict[str, float] | None:
        """The training-free baseline on the same held-out sets: cosine nearest class mean over the
        frozen backbone's features, from the class statistics the worker keeps."""
        classes = self._classes
        if classes is None or self.config.gate.baseline_tolerance is None or not classes.baseline.labels:
            return None
        stats = classes.baseline
        batch = self.config.train.eval_batch_size
        position = {c: i for i, c in enumerate(stats.labels)}
        correct = []
        for name, data in zip(names, sets, strict=True):
            if name not in self._frozen_cache:
                self._frozen_cache[name] = collect_features(model, data, batch, model.backbone_features)
            scores = ncm_logits(self._frozen_cache[name], stats.means)
            target = torch.tensor([position.get(c, -1) for c in data.classes], dtype=torch.long)[data.labels]
            correct.append((scores.argmax(dim=1) == target).double())
        everything = torch.cat(correct)
        return {"new_task": float(correct[-1].mean()), "overall": float(everything.mean())}

    def _publish(
        self,
        model: FMLoRAModel,
        task: TaskInfo,
        parent: VersionInfo | None,
        card: dict[str, Any],
        state: WorkerState,
    ) -> TaskInfo:
        accepted = bool(card["gate"]["passed"])
        # Renew first: the snapshot must be recorded well within the lease it is written under.
        self.registry.renew_lease(WORKER_LEASE, self.id, self.config.lease_ttl_s)
        published = publish_version(
            self.registry,
            model,
            card=card,
            parent=None if parent is None else parent.version,
            task_id=task.id,
            accepted=accepted,
            lease_owner=self.id,
            hook=lambda stage, version: self._stage(stage, version=version),
            worker_state=state.tensors,
            worker_state_meta=state.meta,
        )
        version = published.version
        self._stage("published", version=version, accepted=accepted)
        if accepted:
            log.info("task %s published as live version %d", task.name, version)
        else:
            log.warning("task %s: candidate v%d rejected: %s", task.name, version, card["gate"]["reasons"])
        if self.config.keep_versions is not None:
            self.registry.prune(self.config.keep_versions)
        return self.registry.get_task(task.id)
