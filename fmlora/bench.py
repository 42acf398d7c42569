"""Continual-learning benchmark runs: every (method, seed) on one stream, written as JSON + Markdown."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .config import AdapterConfig, BackboneConfig, ModelConfig, PromptConfig, TrainConfig
from .errors import ConfigError
from .learner import Learner
from .model import FMLoRAModel
from .pretrain import pretrain_backbone
from .snapshot import save_snapshot
from .strategies import apply_strategy
from .synthetic import make_synthetic_stream

__all__ = ["BENCHMARKS", "run_benchmark", "summary_markdown"]

BENCHMARKS = ("synthetic",)

# A ViT small enough to pre-train in seconds on two CPU cores; its weights come from disjoint classes.
SYNTHETIC_BACKBONE = BackboneConfig(
    name="vit_tiny_patch16_224",
    weights="random",
    model_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4},
)


def _synthetic_backbone(cache_dir: Path, seed: int) -> BackboneConfig:
    path = cache_dir / f"synthetic-backbone-seed{seed}.safetensors"
    if not path.exists():
        pretrain_data = make_synthetic_stream(
            num_tasks=1, classes_per_task=32, train_per_class=32, test_per_class=1, seed=10_000 + seed
        )[0].train
        pretrain_backbone(SYNTHETIC_BACKBONE, pretrain_data, path, steps=150, seed=seed, progress_bar=False)
    return SYNTHETIC_BACKBONE.model_copy(update={"weights": "file", "weights_path": path})


def run_benchmark(
    benchmark: str,
    methods: Sequence[str],
    seeds: Sequence[int],
    num_tasks: int,
    epochs: int,
    out: Path,
    lr: float = 5e-3,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for seed in seeds:
        backbone = _synthetic_backbone(out / "backbones", seed)
        tasks = make_synthetic_stream(num_tasks=num_tasks, seed=seed)
        base = ModelConfig(
            backbone=backbone, adapter=AdapterConfig(rank=8, alpha=8), prompts=PromptConfig(bank_size=4, length=4)
        )
        for method in methods:
            torch.manual_seed(seed)
            model = FMLoRAModel(apply_strategy(method, base))
            learner = Learner(TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed))
            started = time.perf_counter()
            adapter_bytes: list[int] = []

            def measure(
                t: int,
                _report: Any,
                _matrix: Any,
                model: FMLoRAModel = model,
                name: str = f"{method}-seed{seed}",
                sizes: list[int] = adapter_bytes,
            ) -> None:
                # Measured from a real snapshot file, then discarded: a benchmark publishes nothing.
                with tempfile.TemporaryDirectory() as scratch:
                    sizes.append(save_snapshot(model, Path(scratch) / f"{name}-task{t}").adapter_bytes)

            matrix, reports = learner.learn_stream(model, tasks, on_task_end=measure)
            results.append(
                {
                    "benchmark": benchmark,
                    "method": method,
                    "seed": seed,
                    "tasks": num_tasks,
                    "backbone": backbone.name,
                    **matrix.summary(),
                    "trainable_params_per_task": [r.trainable_parameters for r in reports],
                    "adapter_bytes_per_task": adapter_bytes,
                    "ranks": [r.task.rank for r in reports],
                    "seconds": time.perf_counter() - started,
                }
            )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "summary.md").write_text(summary_markdown(results))
    return results


def _mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values) * 100
    std = statistics.stdev(values) * 100 if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def summary_markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| method | final accuracy | average incremental accuracy | forgetting | seeds |",
        "|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in results):
        rows = [r for r in results if r["method"] == method]
        lines.append(
            f"| {method} | {_mean_std([r['final_accuracy'] for r in rows])} | "
            f"{_mean_std([r['average_incremental_accuracy'] for r in rows])} | "
            f"{_mean_std([r['forgetting'] for r in rows])} | {len(rows)} |"
        )
    return "\n".join(lines) + "\n"
