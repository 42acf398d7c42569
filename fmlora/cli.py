"""The ``fmlora`` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from fmlora.bench.runner import BENCHMARKS, METHODS, BenchSpec, run_benchmark, summary_markdown
from fmlora.model.backbone import OFFLINE_BACKBONE

from ._version import __version__
from .errors import FmloraError

if TYPE_CHECKING:
    from fmlora.registry.registry import Registry
    from fmlora.registry.store import S3Options

app = typer.Typer(help="fmlora: continually learning image classifiers (FM-LoRA on timm ViTs).", no_args_is_help=True)


def _options(items: list[str], flag: str) -> dict[str, object]:
    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            typer.echo(f"error: {flag} wants KEY=VALUE, got {item!r}", err=True)
            raise typer.Exit(2)
        options[key.strip()] = _option_value(raw)
    return options


def _option_value(raw: str) -> object:
    """A JSON literal where the text is one (1.0, true, null), the text itself otherwise."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@app.command()
def version() -> None:
    """Print the library version."""
    typer.echo(__version__)


@app.command()
def bench(
    benchmark: str = typer.Option("glyphs", help=f"One of: {', '.join(BENCHMARKS)}."),
    methods: str = typer.Option(",".join(METHODS), help=f"Comma-separated, from: {', '.join(METHODS)}."),
    seeds: str = typer.Option("0", help="Comma-separated seeds."),
    tasks: int | None = typer.Option(None, min=2, help="Number of tasks (default: the benchmark's)."),
    epochs: int | None = typer.Option(None, min=1, help="Epochs per task (default: the benchmark's)."),
    backbone: str | None = typer.Option(None, help="timm model name (default: the benchmark's backbone)."),
    backbone_weights: str | None = typer.Option(
        None, help="'pretrained' (timm download), 'random', or a local weight file (default: the benchmark's)."
    ),
    data_root: Path | None = typer.Option(None, help="Dataset root for the paper benchmarks."),
    device: str = typer.Option("cpu", help="torch device, e.g. cuda."),
    out: Path = typer.Option(Path("runs/bench"), help="Output directory (results.json, summary.md, PNGs)."),
    train_option: list[str] = typer.Option(
        [], help="KEY=VALUE, a TrainConfig field over the benchmark's (repeatable), e.g. later_lr_scale=1.0."
    ),
    model_option: list[str] = typer.Option(
        [], help="PATH=VALUE, a ModelConfig field by dotted path (repeatable), e.g. adapter.train_bases=every_task."
    ),
    train_per_class: int | None = typer.Option(
        None,
        min=1,
        help="Train on the first N images of each class only (e.g. 32 of the glyphs' 40: what the worker "
        "learns from once intake holds out a fifth for the gate).",
    ),
    fold_in_rest: bool = typer.Option(
        False,
        help="With --train-per-class: after each task, solve the ridge head from the images left out "
        "of training too, as the worker does with its gate images once a candidate passes.",
    ),
) -> None:
    """Run continual-learning methods on a task stream; write results.json, summary.md and plots."""
    options, model_options = _options(train_option, "--train-option"), _options(model_option, "--model-option")
    spec = BenchSpec(
        benchmark=benchmark,
        methods=tuple(_split(methods)),
        seeds=tuple(int(s) for s in _split(seeds)),
        out=out,
        num_tasks=tasks,
        epochs=epochs,
        backbone_name=backbone,
        backbone_weights=backbone_weights,
        data_root=data_root,
        device=device,
        train_options=options,
        model_options=model_options,
        train_per_class=train_per_class,
        fold_in_rest=fold_in_rest,
    )
    try:
        results = run_benchmark(spec)
    except FmloraError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(summary_markdown(results))
    typer.echo(f"wrote {out / 'results.json'}, {out / 'summary.md'} and plots in {out}")


@app.command()
def pretrain(
    out: Path = typer.Option(
        Path("runs/pretrain/glyph-vit-s32.safetensors"),
        help="Where to write the weights (the shipped copy is fmlora/assets/glyph-vit-s32.safetensors).",
    ),
    steps: int = typer.Option(2400, min=1),
    batch_size: int = typer.Option(128, min=1),
    lr: float = typer.Option(1e-3, min=0.0),
    classes: int = typer.Option(300, min=2, help="Pre-training characters, disjoint from the benchmark's."),
    seed: int = typer.Option(0),
    bf16: bool = typer.Option(True, help="bfloat16 autocast (fast on GPUs and CPUs with AVX512-BF16/AMX)."),
) -> None:
    """Pre-train the offline glyph ViT on characters disjoint from the benchmark (no download)."""
    import json

    import torch

    from fmlora.data.glyphs import GlyphSampler, pretraining_characters, render_pretraining_set
    from fmlora.training.pretrain import pretrain_backbone

    try:
        characters = pretraining_characters(classes)
    except FmloraError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    held_out = render_pretraining_set(characters, per_class=10, seed=10_000 + seed)
    report = pretrain_backbone(
        OFFLINE_BACKBONE.model_copy(update={"weights": "random", "weights_path": None}),
        GlyphSampler(characters, seed=seed),
        out,
        num_classes=len(characters),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        label_smoothing=0.1,
        autocast_dtype=torch.bfloat16 if bf16 else None,
        seed=seed,
        held_out=held_out,
        metadata={"characters": "".join(characters), "steps": str(steps), "seed": str(seed)},
        half_precision=True,
        on_step=lambda step, loss: (
            typer.echo(f"step {step}/{steps} loss {loss:.3f}", err=True) if step % 50 == 0 else None
        ),
    )
    report.update({"characters": "".join(characters), "batch_size": batch_size, "lr": lr, "seed": seed})
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "characters"}, indent=2))


def _home_registry(
    home: Path,
    backbone: str | None,
    backbone_weights: str | None,
    registry_url: str | None = None,
    store_url: str | None = None,
    s3: S3Options | None = None,
) -> Registry:
    from fmlora.model.config import BackboneConfig, ModelConfig, override_backbone
    from fmlora.registry.registry import Registry

    config = None
    if backbone is not None:
        config = ModelConfig(backbone=override_backbone(BackboneConfig(name=backbone), None, backbone_weights or None))
    return Registry.open(home, config, registry_url=registry_url or None, store_url=store_url or None, s3=s3)


@app.command()
def worker(
    home: Path = typer.Option(Path("fmlora-home"), envvar="FMLORA_HOME", help="Registry directory (FMLORA_HOME)."),
    backbone: str | None = typer.Option(
        None, envvar="FMLORA_BACKBONE", help="timm model for a NEW home (default: the offline glyph ViT)."
    ),
    backbone_weights: str | None = typer.Option(
        None, envvar="FMLORA_BACKBONE_WEIGHTS", help="'pretrained', 'random' or a local weight file (new home)."
    ),
    epochs: int = typer.Option(5, min=1, envvar="FMLORA_WORKER_EPOCHS"),
    batch_size: int = typer.Option(32, min=1, envvar="FMLORA_WORKER_BATCH_SIZE"),
    lr: float = typer.Option(2e-3, min=0.0, envvar="FMLORA_WORKER_LR"),
    autocast: str = typer.Option(
        "none", envvar="FMLORA_WORKER_AUTOCAST", help="'bfloat16', 'float16' or 'none' (fp32)."
    ),
    device: str = typer.Option(
        "auto", envvar="FMLORA_WORKER_DEVICE", help="torch device for training; auto = cuda when available."
    ),
    # Off by default: on the worker's own regime (32 of 40 glyph images per class) two views measured
    # +0.55 final accuracy over three seeds, within the seed spread, for an extra forward pass per
    # view (README, "Extra views").
    statistics_views: int = typer.Option(
        0,
        min=0,
        envvar="FMLORA_WORKER_STATISTICS_VIEWS",
        help="Random resized crops of each training image added to the ridge head's class statistics "
        "(0: the images only). Each costs one more forward pass over the task's images.",
    ),
    fold_in_held_out: bool = typer.Option(
        True,
        envvar="FMLORA_WORKER_FOLD_IN_HELD_OUT",
        help="Once a candidate passes the gate, solve the served head from the task's held-out images "
        "too (the gate keeps scoring heads that never saw them); --no-fold-in-held-out serves the gated head.",
    ),
    min_new_task_accuracy: float = typer.Option(
        0.0,
        envvar="FMLORA_GATE_MIN_NEW_TASK_ACCURACY",
        help="Promotion gate: minimum held-out accuracy of the new task.",
    ),
    max_forgetting: float = typer.Option(
        1.0,
        envvar="FMLORA_GATE_MAX_FORGETTING",
        help="Promotion gate: largest allowed accuracy drop of an earlier task.",
    ),
    baseline_tolerance: float = typer.Option(
        0.05,
        min=0.0,
        envvar="FMLORA_GATE_BASELINE_TOLERANCE",
        help="Promotion gate: how far below the training-free baseline (nearest class mean on the frozen "
        "backbone, same held-out images) a candidate may fall; 1 turns the check off.",
    ),
    keep_versions: int | None = typer.Option(
        None, min=0, envvar="FMLORA_KEEP_VERSIONS", help="Retention: non-live versions kept (default: all)."
    ),
    exit_when_idle: bool = typer.Option(False, help="Exit once the queue is empty (batch jobs, tests)."),
    registry_url: str | None = typer.Option(
        None, envvar="FMLORA_REGISTRY_URL", help="sqlite:///path or postgresql://user@host:port/db (default: HOME)."
    ),
    store_url: str | None = typer.Option(
        None, envvar="FMLORA_STORE_URL", help="file:///path or s3://bucket/prefix (default: HOME)."
    ),
    s3_endpoint_url: str | None = typer.Option(
        None, envvar="FMLORA_S3_ENDPOINT_URL", help="An S3-compatible endpoint (MinIO, Ceph RGW) for s3:// stores."
    ),
    s3_region: str | None = typer.Option(None, envvar="FMLORA_S3_REGION", help="S3 region."),
    s3_addressing_style: str | None = typer.Option(
        None, envvar="FMLORA_S3_ADDRESSING_STYLE", help="S3 addressing: path (MinIO) or virtual."
    ),
    parent_pid: int | None = typer.Option(
        None, envvar="FMLORA_PARENT_PID", help="Stop (requeueing the task) when this process is gone."
    ),
) -> None:
    """Train queued tasks one after another and publish each as a snapshot (one worker trains at a time;
    more workers wait as standbys and take over when the lease holder dies)."""
    import logging
    import signal

    import torch

    from fmlora.training.config import TrainConfig
    from fmlora.worker import GateConfig, Worker, WorkerConfig

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from fmlora.registry.store import S3Options

        s3 = S3Options(endpoint_url=s3_endpoint_url, region=s3_region, addressing_style=s3_addressing_style)
        registry = _home_registry(home, backbone, backbone_weights, registry_url, store_url, s3)
        train = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            device=device,
            autocast_dtype=None if autocast == "none" else autocast,
            statistics_views=statistics_views,
        )
        config = WorkerConfig(
            train=train,
            gate=GateConfig(
                min_new_task_accuracy=min_new_task_accuracy,
                max_forgetting=max_forgetting,
                baseline_tolerance=baseline_tolerance,
            ),
            keep_versions=keep_versions,
            fold_in_held_out=fold_in_held_out,
        )
    except FmloraError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    runner = Worker(registry, config)
    # SIGTERM/SIGINT abandon the current step; the task goes back to the queue for the next worker.
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    signal.signal(signal.SIGINT, lambda *_: runner.stop())
    if parent_pid:
        from fmlora.worker.parent import watch_parent

        watch_parent(parent_pid, runner.stop)
    typer.echo(f"worker {runner.id} on {registry.db.display}, objects in {registry.store.url}", err=True)
    runner.run_forever(exit_when_idle=exit_when_idle)


@app.command("export-onnx")
def export_onnx_command(
    out: Path = typer.Option(Path("model.onnx"), help="Where to write the graph (+ <out>.json, its input spec)."),
    home: Path | None = typer.Option(
        None, envvar="FMLORA_HOME", help="Registry whose model configuration to export (default: ModelConfig())."
    ),
    opset: int = typer.Option(18, min=17),
) -> None:
    """Export the backbone with the adapter as graph INPUTS: one ONNX graph serves every snapshot version."""
    from fmlora.export.onnx import export_onnx
    from fmlora.model.config import ModelConfig
    from fmlora.model.model import FMLoRAModel
    from fmlora.registry.registry import Registry

    try:
        config = Registry.open(home).model_config if home is not None else ModelConfig()
        spec = export_onnx(FMLoRAModel(config), out, opset=opset)
    except FmloraError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except ImportError as exc:
        typer.echo(f"error: {exc}; install the extra: pip install 'fmlora[onnx]'", err=True)
        raise typer.Exit(2) from None
    out.with_name(out.name + ".json").write_text(spec.to_json())
    typer.echo(f"wrote {out} and {out.name}.json")


def _load_plugins(target: typer.Typer) -> None:
    """Commands from other installed packages (the server, the client SDK) that fmlora must not import."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="fmlora.commands"):
        try:
            register = entry.load()
        except ImportError:
            continue  # that package's optional dependencies are not installed: its commands are absent
        register(target)


def main() -> None:
    """The ``fmlora`` console script: library commands plus those of installed plugins."""
    # Loaded here, not at import: importing fmlora.cli must not import the web stack.
    _load_plugins(app)
    app()


if __name__ == "__main__":
    main()
