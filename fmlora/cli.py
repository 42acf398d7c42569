"""The ``fmlora`` command line."""

from __future__ import annotations

from pathlib import Path

import typer

from ._version import __version__
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


if __name__ == "__main__":
    app()
