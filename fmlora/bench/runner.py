"""Continual-learning benchmarks: every (method, seed) on one task stream, in one run.

Writes ``results.json`` (one object per method and seed), ``summary.md`` (mean ± std) and PNGs of
each method's accuracy matrix and of accuracy against tasks.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from tqdm.auto import tqdm

from fmlora.data.images import ImageSource, TaskData, after_first_per_class, concat_sources, first_per_class
from fmlora.data.synthetic import make_synthetic_stream
from fmlora.errors import ConfigError, DataError
from fmlora.model.config import AdapterConfig, BackboneConfig, ModelConfig, PromptConfig, override_backbone
from fmlora.model.model import FMLoRAModel
from fmlora.model.snapshot import save_snapshot
from fmlora.training.config import TrainConfig
from fmlora.training.learner import Learner, evaluate, new_statistics
from fmlora.training.pretrain import pretrain_backbone
from fmlora.training.strategies import STRATEGIES, apply_strategy, apply_training_strategy

from .baselines import BASELINES, run_baseline

__all__ = ["BENCHMARKS", "METHODS", "BenchSpec", "run_benchmark", "summary_markdown"]

METHODS = (*STRATEGIES, "joint", "joint-linear", *BASELINES)


@dataclass(frozen=True)
class Benchmark:
    """How to build a stream and what to run it with unless the caller overrides it."""

    build: Callable[[int, int, tuple[int, int], Path | None], list[TaskData]]
    default_tasks: int
    backbone: Callable[[Path], BackboneConfig]
    train: TrainConfig
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    needs_data: bool = False


# A ViT small enough to pre-train in seconds on two CPU cores; its weights come from disjoint classes.
SYNTHETIC_BACKBONE = BackboneConfig(
    name="vit_tiny_patch16_224",
    weights="random",
    model_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4},
)


def _synthetic_backbone(cache_dir: Path) -> BackboneConfig:
    path = cache_dir / "synthetic-backbone.safetensors"
    if not path.exists():
        pretrain_data = make_synthetic_stream(
            num_tasks=1, classes_per_task=32, train_per_class=32, test_per_class=1, seed=10_000
        )[0].train
        pretrain_backbone(SYNTHETIC_BACKBONE, pretrain_data, path, steps=150, seed=0, progress_bar=False)
    return SYNTHETIC_BACKBONE.model_copy(update={"weights": "file", "weights_path": path})


def _offline_backbone(_: Path) -> BackboneConfig:
    from fmlora.model.backbone import OFFLINE_BACKBONE

    return OFFLINE_BACKBONE


def _paper_backbone(_: Path) -> BackboneConfig:
    # The baselines' backbone; pixels in [0, 1] without normalisation, as InfLoRA/CODA-P/SD-LoRA feed them.
    return BackboneConfig(
        name="vit_base_patch16_224.augreg_in21k",
        weights="pretrained",
        data_config_overrides={"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)},
    )


def _glyphs(kind: str, train: int, test: int) -> Callable[[int, int, tuple[int, int], Path | None], list[TaskData]]:
    def build(seed: int, tasks: int, size: tuple[int, int], _: Path | None) -> list[TaskData]:
        from fmlora.data.glyphs import make_glyph_stream

        return make_glyph_stream(kind, tasks, train_per_class=train, test_per_class=test, seed=seed, image_size=size[0])

    return build


def _grating(seed: int, tasks: int, size: tuple[int, int], _: Path | None) -> list[TaskData]:
    from fmlora.data.grating import make_grating_stream

    return make_grating_stream(tasks, train_per_class=40, test_per_class=20, seed=seed, image_size=size[0])


def _synthetic(seed: int, tasks: int, size: tuple[int, int], _: Path | None) -> list[TaskData]:
    return make_synthetic_stream(num_tasks=tasks, seed=seed, image_size=size[0])


def _paper(name: str) -> Callable[[int, int, tuple[int, int], Path | None], list[TaskData]]:
    def build(seed: int, tasks: int, size: tuple[int, int], root: Path | None) -> list[TaskData]:
        from fmlora.data.datasets import PAPER_BENCHMARKS

        if root is None:
            raise ConfigError(f"benchmark {name!r} needs --data-root pointing at the dataset")
        return PAPER_BENCHMARKS[name](root, tasks, size, seed)

    return build


_PAPER_TRAIN = {"imagenet-r": 50, "cifar100": 20, "cub200": 20, "domainnet": 5, "domainnet-dil": 5}
_PAPER_TASKS = {"imagenet-r": 10, "cifar100": 10, "cub200": 10, "domainnet": 5, "domainnet-dil": 6}

BENCHMARKS: dict[str, Benchmark] = {
    "glyphs": Benchmark(
        _glyphs("class", 40, 20),
        10,
        _offline_backbone,
        TrainConfig(epochs=5, batch_size=32, lr=2e-3, autocast_dtype="bfloat16"),
    ),
    "glyphs-dil": Benchmark(
        _glyphs("domain", 16, 10),
        5,
        _offline_backbone,
        TrainConfig(epochs=3, batch_size=32, lr=2e-3, autocast_dtype="bfloat16"),
    ),
    # Where the shipped backbone is weak (fmlora/data/grating.py): adaptation has something to add.
    "glyphs-grating": Benchmark(
        _grating,
        10,
        _offline_backbone,
        TrainConfig(epochs=5, batch_size=32, lr=2e-3, autocast_dtype="bfloat16"),
    ),
    "synthetic": Benchmark(
        _synthetic,
        3,
        _synthetic_backbone,
        TrainConfig(epochs=10, batch_size=16, lr=5e-3),
        AdapterConfig(rank=8, alpha=8),
        PromptConfig(bank_size=4, length=4),
    ),
    **{
        name: Benchmark(
            _paper(name),
            _PAPER_TASKS[name],
            _paper_backbone,
            TrainConfig(
                epochs=epochs,
                batch_size=128,
                lr=5e-4,
                autocast_dtype="bfloat16",
                augment=True,
                loader_workers=8,
            ),
            AdapterConfig(rank=10, alpha=10),
            needs_data=True,
        )
        for name, epochs in _PAPER_TRAIN.items()
    },
}


@dataclass(frozen=True)
class BenchSpec:
    benchmark: str
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    out: Path
    num_tasks: int | None = None
    epochs: int | None = None
    # A full backbone config, or just another timm name and/or weight source on top of the benchmark's.
    backbone: BackboneConfig | None = None
    backbone_name: str | None = None
    backbone_weights: str | None = None
    data_root: Path | None = None
    device: str = "cpu"
    # TrainConfig fields set on top of the benchmark's (e.g. {"later_lr_scale": 1.0}), for ablations.
    train_options: dict[str, Any] = field(default_factory=dict)
    # ModelConfig fields by dotted path (e.g. {"adapter.train_bases": "every_task"}), for ablations.
    model_options: dict[str, Any] = field(default_factory=dict)
    # Train on only the first this many images of each class of every task (None: all): e.g. 32 of
    # the glyphs' 40, what a worker learns from once intake holds out a fifth for the promotion gate.
    train_per_class: int | None = None
    # With train_per_class: the images left out of training join the ridge head after each task
    # (fold_in_held_out), as a worker's gate images do once its candidate passes the gate.
    fold_in_rest: bool = False


def _model_config(bench: Benchmark, backbone: BackboneConfig) -> ModelConfig:
    return ModelConfig(backbone=backbone, adapter=bench.adapter, prompts=bench.prompts)


def _with_options(config: ModelConfig, options: dict[str, Any]) -> ModelConfig:
    """``config`` with dotted-path fields replaced, validated as a whole."""
    data = config.model_dump()
    for path, value in options.items():
        *parents, leaf = path.split(".")
        node = data
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise ConfigError(f"bad model option {path!r}: {key!r} is not a section of ModelConfig")
            node = node[key]
        if leaf not in node:
            raise ConfigError(f"bad model option {path!r}: no field {leaf!r}")
        node[leaf] = value
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"bad model option: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}") from None


def _snapshot_bytes(model: FMLoRAModel) -> tuple[int, int]:
    """(the adapter's bytes, every file of the served snapshot together)."""
    with tempfile.TemporaryDirectory() as scratch:
        adapter = save_snapshot(model, Path(scratch) / "s").adapter_bytes
        total = sum(f.stat().st_size for f in (Path(scratch) / "s").rglob("*") if f.is_file())
        return adapter, total


def _run_sequential(
    method: str,
    config: ModelConfig,
    tasks: list[TaskData],
    learner: Learner,
    held_out: list[ImageSource] | None = None,
) -> dict[str, Any]:
    model = FMLoRAModel(apply_strategy(method, config))
    if model.head.feature_map is None:
        held_out = None  # only a solved head can take images after training
    adapter_bytes: list[int] = []
    snapshot_bytes: list[int] = []

    def measure(_t: int, _report: Any, _matrix: Any) -> None:
        adapter, total = _snapshot_bytes(model)
        adapter_bytes.append(adapter)
        snapshot_bytes.append(total)

    matrix, reports = learner.learn_stream(model, tasks, on_task_end=measure, held_out=held_out)
    return {
        **matrix.summary(),
        "held_out_folded_in": held_out is not None,
        "prompt_modes": _prompt_modes(model, tasks, learner) if model.prompt_bank is not None else None,
        "trainable_params_per_task": [r.trainable_parameters for r in reports],
        "adapter_bytes_per_task": adapter_bytes,
        "snapshot_bytes_per_task": snapshot_bytes,
        "ranks": [r.task.rank for r in reports],
        "task_complexity": [round(r.task.complexity, 4) for r in reports],
        # How far each task's training moved its own features (relative), and whether earlier
        # classes' statistics were moved with them.
        "feature_drift_per_task": [None if r.feature_drift is None else round(r.feature_drift, 5) for r in reports],
        "drift_compensated_per_task": [r.drift_compensated for r in reports],
        "pre_task_error_per_task": [None if r.pre_task_error is None else round(r.pre_task_error, 4) for r in reports],
        "views_per_task": [r.views for r in reports],
        "novel_per_task": [r.novel for r in reports],
        "relative_lambda_per_task": [r.relative_lambda for r in reports],
    }


def _prompt_modes(model: FMLoRAModel, tasks: list[TaskData], learner: Learner) -> dict[str, float]:
    """Final accuracy with each per-request meta-prompt mode: ``auto`` (the default), ``none``, and
    ``task`` (every test image told its own task: an oracle that bounds what routing could give)."""
    sizes = [len(t.test) for t in tasks]
    batch = learner.config.eval_batch_size

    def mean(accuracies: list[float]) -> float:
        return sum(a * n for a, n in zip(accuracies, sizes, strict=True)) / sum(sizes)

    return {
        "auto": mean([evaluate(model, t.test, "auto", batch) for t in tasks]),
        "none": mean([evaluate(model, t.test, "none", batch) for t in tasks]),
        "task": mean([evaluate(model, t.test, {"task": t.name}, batch) for t in tasks]),
    }


def _run_joint(config: ModelConfig, tasks: list[TaskData], learner: Learner, linear: bool) -> dict[str, Any]:
    """Upper bound: LoRA trained once on every task's data together (same epochs per image), with
    the default pipeline's head (``joint``, the fair bound) or a linear head (``joint-linear``)."""
    head = config.head.model_copy(update={"kind": "linear"}) if linear else config.head
    model = FMLoRAModel(apply_strategy("seq-lora", config).model_copy(update={"head": head}))
    union = concat_sources([t.train for t in tasks])
    statistics = new_statistics(model) if model.head.feature_map is not None else None
    joint = TaskData("joint", "class", union, concat_sources([t.test for t in tasks]))
    report = learner.learn_task(model, joint, statistics=statistics)
    row = [evaluate(model, t.test, batch_size=learner.config.eval_batch_size) for t in tasks]
    sizes = [len(t.test) for t in tasks]
    adapter_bytes, snapshot_bytes = _snapshot_bytes(model)  # one save gives both
    final = sum(a * n for a, n in zip(row, sizes, strict=True)) / sum(sizes)
    return {
        "accuracy_matrix": [row],
        "accuracy_curve": [final],
        "final_accuracy": final,
        "average_incremental_accuracy": None,
        "forgetting": None,
        "trainable_params_per_task": [report.trainable_parameters],
        "adapter_bytes_per_task": [adapter_bytes],
        "snapshot_bytes_per_task": [snapshot_bytes],
        "ranks": [report.task.rank],
        "task_complexity": [round(report.task.complexity, 4)],
    }


def run_benchmark(spec: BenchSpec) -> list[dict[str, Any]]:
    if spec.benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {spec.benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    unknown = [m for m in spec.methods if m not in METHODS]
    if unknown or not spec.methods:
        raise ConfigError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    bench = BENCHMARKS[spec.benchmark]
    spec.out.mkdir(parents=True, exist_ok=True)
    if any(s < 0 for s in spec.seeds) or not spec.seeds:
        raise ConfigError("seeds must be non-negative integers")
    backbone = spec.backbone or override_backbone(
        bench.backbone(spec.out / "backbones"), spec.backbone_name, spec.backbone_weights
    )
    config = _with_options(_model_config(bench, backbone), spec.model_options)
    try:
        train = TrainConfig.model_validate(
            {
                **bench.train.model_dump(),
                **spec.train_options,
                "device": spec.device,
                **({"epochs": spec.epochs} if spec.epochs else {}),
            }
        )
    except ValidationError as exc:
        raise ConfigError(f"bad training option: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}") from None
    num_tasks = spec.num_tasks or bench.default_tasks
    probe = FMLoRAModel(config)
    image_size, fingerprint = probe.preprocessor.input_size, probe.backbone_sha256
    del probe
    results: list[dict[str, Any]] = []
    runs = tqdm(total=len(spec.seeds) * len(spec.methods), desc=f"bench {spec.benchmark}", disable=None)
    for seed in spec.seeds:
        tasks = bench.build(seed, num_tasks, image_size, spec.data_root)
        rest = None
        if spec.train_per_class is not None:
            if spec.fold_in_rest:
                rest = [after_first_per_class(t.train, spec.train_per_class) for t in tasks]
            tasks = [replace(t, train=first_per_class(t.train, spec.train_per_class)) for t in tasks]
        elif spec.fold_in_rest:
            raise ConfigError("folding in the rest needs --train-per-class (what is left out of training)")
        if len(tasks) < 2:
            raise DataError("a continual-learning benchmark needs at least two tasks")
        for method in spec.methods:
            runs.set_postfix(method=method, seed=seed)
            torch.manual_seed(seed)  # the adapter's own initialisation (prompt bank, bases)
            learner = Learner(apply_training_strategy(method, train.model_copy(update={"seed": seed})))
            started = time.perf_counter()
            if method in ("joint", "joint-linear"):
                measured = _run_joint(config, tasks, learner, linear=method == "joint-linear")
            elif method in BASELINES:
                measured = run_baseline(method, config, tasks, learner.config, seed)
            else:
                measured = _run_sequential(method, config, tasks, learner, rest)
            results.append(
                {
                    "benchmark": spec.benchmark,
                    "method": method,
                    "seed": seed,
                    "tasks": len(tasks),
                    "backbone": backbone.name,
                    "backbone_config": backbone.model_dump(mode="json"),
                    "backbone_sha256": fingerprint,
                    "kind": tasks[0].kind,
                    "protocol": "joint" if method.startswith("joint") else "sequential",
                    "training_free": method in BASELINES,
                    "task_names": [t.name for t in tasks],
                    "task_classes": [list(t.classes) for t in tasks],
                    **measured,
                    "seconds": time.perf_counter() - started,
                    "epochs": train.epochs,
                    "train_config": train.model_dump(mode="json"),
                    "model_options": dict(spec.model_options),
                    "train_per_class": spec.train_per_class,
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
            )
            runs.update(1)
            (spec.out / "results.json").write_text(json.dumps(results, indent=2))
    runs.close()
    (spec.out / "summary.md").write_text(summary_markdown(results))
    from .plots import plot_results

    plot_results(results, spec.out)
    return results


def _mean_std(values: Sequence[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    mean = statistics.fmean(present) * 100
    std = statistics.stdev(present) * 100 if len(present) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def summary_markdown(results: list[dict[str, Any]]) -> str:
    if not results:
        return "no results\n"
    first = results[0]
    lines = [
        f"benchmark `{first['benchmark']}`, {first['tasks']} tasks, backbone `{first['backbone']}`, "
        f"{first['epochs']} epochs per task; mean ± std over seeds, in %",
        "",
        "| method | final accuracy | average incremental accuracy | forgetting | seeds | seconds per run |",
        "|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in results):
        rows = [r for r in results if r["method"] == method]
        lines.append(
            f"| {method} | {_mean_std([r['final_accuracy'] for r in rows])} | "
            f"{_mean_std([r['average_incremental_accuracy'] for r in rows])} | "
            f"{_mean_std([r['forgetting'] for r in rows])} | {len(rows)} | "
            f"{statistics.fmean(r['seconds'] for r in rows):.0f} |"
        )
    prompted = [m for m in dict.fromkeys(r["method"] for r in results) if _has_prompt_modes(results, m)]
    if prompted:
        lines += [
            "",
            "Final accuracy by per-request meta-prompt mode (`task`: each image told its own task, an oracle):",
            "",
            "| method | auto | none | task |",
            "|---|---|---|---|",
        ]
        for method in prompted:
            rows = [r["prompt_modes"] for r in results if r["method"] == method]
            cells = " | ".join(_mean_std([m[mode] for m in rows]) for mode in ("auto", "none", "task"))
            lines.append(f"| {method} | {cells} |")
    return "\n".join(lines) + "\n"


def _has_prompt_modes(results: list[dict[str, Any]], method: str) -> bool:
    return all(r.get("prompt_modes") for r in results if r["method"] == method)
