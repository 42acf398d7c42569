"""``python -m server``: the server's commands without the fmlora CLI (``serve``, ``openapi``)."""

from __future__ import annotations

from pathlib import Path

import typer

from server.cli import openapi_document, register

app = typer.Typer(help="fmlora server commands.", no_args_is_help=True, add_completion=False)
register(app)


@app.command()
def openapi(out: Path | None = typer.Option(None, help="Write here instead of stdout (e.g. openapi.json).")) -> None:
    """Print the OpenAPI schema exactly as committed in openapi.json."""
    document = openapi_document()
    if out is None:
        typer.echo(document, nl=False)
    else:
        out.write_text(document, encoding="utf-8")


if __name__ == "__main__":
    app()
