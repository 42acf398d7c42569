"""The ``fmlora`` command line."""

from __future__ import annotations

from pathlib import Path

import typer

from ._version import __version__
from .backbone import OFFLINE_BACKBONE
from .bench import BENCHMARKS, METHODS, BenchSpec, run_benchmark, summary_markdown
from .errors import FmloraError

app = typer.Typer(help="fmlora: continually learning image classifiers (FM-LoRA on timm ViTs).", no_args_is_help=True)


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
) -> None:
    """Run continual-learning methods on a task stream; write results.json, summary.md and plots."""
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

    from .glyphs import GlyphSampler, pretraining_characters, render_pretraining_set
    from .pretrain import pretrain_backbone

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


if __name__ == "__main__":
    app()
