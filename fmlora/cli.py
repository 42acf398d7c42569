"""The ``fmlora`` command line."""

from __future__ import annotations

from pathlib import Path

import typer

from ._version import __version__
from .backbone import OFFLINE_BACKBONE, OFFLINE_WEIGHTS
from .bench import BENCHMARKS, run_benchmark, summary_markdown
from .errors import FmloraError
from .strategies import STRATEGIES

app = typer.Typer(help="fmlora: continually learning image classifiers (FM-LoRA on timm ViTs).", no_args_is_help=True)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@app.command()
def version() -> None:
    """Print the library version."""
    typer.echo(__version__)


@app.command()
def bench(
    benchmark: str = typer.Option("synthetic", help=f"One of: {', '.join(BENCHMARKS)}."),
    methods: str = typer.Option("fmlora,seq-lora", help=f"Comma-separated, from: {', '.join(STRATEGIES)}."),
    seeds: str = typer.Option("0", help="Comma-separated seeds."),
    tasks: int = typer.Option(3, min=2, help="Number of tasks in the stream."),
    epochs: int = typer.Option(10, min=1, help="Epochs per task."),
    out: Path = typer.Option(Path("runs/bench"), help="Output directory for results.json and summary.md."),
) -> None:
    """Run continual-learning methods on a task stream and write results.json + summary.md."""
    try:
        results = run_benchmark(benchmark, _split(methods), [int(s) for s in _split(seeds)], tasks, epochs, out)
    except FmloraError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(summary_markdown(results))
    typer.echo(f"wrote {out / 'results.json'} and {out / 'summary.md'}")


@app.command()
def pretrain(
    out: Path = typer.Option(OFFLINE_WEIGHTS, help="Where to write the backbone weights (safetensors)."),
    steps: int = typer.Option(3000, min=1),
    batch_size: int = typer.Option(128, min=1),
    lr: float = typer.Option(1e-3, min=0.0),
    classes: int = typer.Option(300, min=2, help="Pre-training characters, disjoint from the benchmark's."),
    seed: int = typer.Option(0),
    bf16: bool = typer.Option(True, help="bfloat16 autocast (fast on CPUs with AVX512-BF16/AMX)."),
) -> None:
    """Pre-train the offline glyph ViT on characters disjoint from the benchmark (no download)."""
    import json

    import torch

    from .glyphs import GlyphSampler, pretraining_characters, render_pretraining_set
    from .pretrain import pretrain_backbone

    characters = pretraining_characters(classes)
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
