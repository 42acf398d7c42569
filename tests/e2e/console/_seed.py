"""A registry home with a short, realistic history for the console: tasks learned by the real worker
(so every version carries a full evaluation card), one candidate the promotion gate rejects and one
task that fails, all on the tiny test backbone, in-process, in a few seconds."""

from __future__ import annotations

import io
import json
from pathlib import Path

from fmlora.registry.artifacts import fetch_task
from fmlora.registry.intake import submit_task
from fmlora.registry.registry import Registry
from fmlora.training.config import TrainConfig
from fmlora.worker.worker import GateConfig, Worker, WorkerConfig
from tests.e2e._homes import tiny_file_config
from tests.e2e.test_serve import zip_task

# Colour per class: distinct hues, so the tiny random ViT can tell most of them apart.
LEARNED = {
    "fruit": {"apple": (210, 40, 40), "lime": (60, 200, 60)},
    "sky": {"dawn": (250, 170, 60), "dusk": (70, 40, 140)},
    "sea": {"reef": (20, 170, 180), "deep": (10, 30, 90)},
}
# Two classes with the same images: no model can tell them apart, so the candidate misses the gate.
AMBIGUOUS = {"twin-a": (128, 128, 128), "twin-b": (128, 128, 128)}
GATE = GateConfig(min_new_task_accuracy=0.6, max_forgetting=1.0, baseline_tolerance=None)


def _train(gate: GateConfig) -> WorkerConfig:
    return WorkerConfig(
        train=TrainConfig(epochs=2, batch_size=8, lr=2e-3, progress_bar=False),
        gate=gate,
        progress_interval_s=0.0,
    )


def _run_one(registry: Registry, gate: GateConfig) -> str:
    worker = Worker(registry, _train(gate))
    try:
        task = worker.run_once()
    finally:
        worker.release()
    assert task is not None
    return task.status


def seed_home(home: Path) -> Registry:
    """Versions v1–v3 live in turn (fruit, sky, sea), v4 rejected (twins), and task 'broken' failed."""
    registry = Registry.open(home, tiny_file_config(home.parent / "backbone"))
    for name, classes in LEARNED.items():
        submit_task(registry, io.BytesIO(zip_task(classes, per_class=8)), name=name, kind="class")
        assert _run_one(registry, GateConfig()) == "live"
    submit_task(registry, io.BytesIO(zip_task(AMBIGUOUS, per_class=8)), name="twins", kind="class")
    assert _run_one(registry, GATE) == "rejected"
    # A stored task whose held-out split went missing: the worker fails it with the library's message.
    broken = submit_task(
        registry, io.BytesIO(zip_task({"sand": (220, 200, 140), "rock": (90, 80, 70)})), name="broken", kind="class"
    )
    # The worker reads the task from this host's unpacked copy of the stored archive: break it there.
    manifest = fetch_task(registry, broken.id) / "task.json"
    data = json.loads(manifest.read_text(encoding="utf-8"))
    data["files"]["eval"] = []
    manifest.write_text(json.dumps(data), encoding="utf-8")
    assert _run_one(registry, GateConfig()) == "failed"
    return registry
