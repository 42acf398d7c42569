"""Client-side commands: predict, submit, tasks, models, activate.

They join the ``fmlora`` CLI through the entry point group ``fmlora.commands`` (``register(app)``), and run
on their own as ``fmlora-client`` where the library is not installed. Tables by default, ``--json`` for
machines. Connection settings come from ``--url/--api-key/--admin-key`` or FMLORA_URL, FMLORA_API_KEY,
FMLORA_ADMIN_KEY. Exit status: 0 ok, 1 an API or input error (message on stderr), 2 usage.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

try:
    import typer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the fmlora-client CLI needs typer: pip install 'fmlora-client[cli]'") from exc

from pydantic import BaseModel

from ._config import ENV_ADMIN_KEY, ENV_API_KEY, ENV_URL
from .client import Client
from .errors import APIStatusError, FmloraClientError
from .models import ModelsInfo, Prediction, TaskInfo, VersionInfo

__all__ = ["app", "main", "make_client", "register"]

UrlOpt = Annotated[
    str | None, typer.Option("--url", envvar=ENV_URL, help="Server base URL (default http://127.0.0.1:8000)")
]
ApiKeyOpt = Annotated[str | None, typer.Option("--api-key", envvar=ENV_API_KEY, help="API key", show_envvar=True)]
AdminKeyOpt = Annotated[
    str | None, typer.Option("--admin-key", envvar=ENV_ADMIN_KEY, help="Admin key", show_envvar=True)
]
TimeoutOpt = Annotated[float | None, typer.Option("--timeout", help="Per-request timeout in seconds")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")]


def make_client(
    url: str | None = None,
    api_key: str | None = None,
    admin_key: str | None = None,
    timeout: float | None = None,
) -> Client:
    """The Client every command uses (tests replace it to inject a transport)."""
    kwargs: dict[str, Any] = {"api_key": api_key, "admin_key": admin_key}
    if timeout is not None:
        kwargs["timeout"] = timeout
    return Client(url, **kwargs)


@contextmanager
def _client(url: str | None, api_key: str | None, admin_key: str | None, timeout: float | None) -> Iterator[Client]:
    try:
        with make_client(url, api_key, admin_key, timeout) as client:
            yield client
    except APIStatusError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (FmloraClientError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


# -- output ------------------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _dump(value: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> str:
    if isinstance(value, BaseModel):
        data: Any = value.model_dump(mode="json")
    elif isinstance(value, dict):
        data = value
    else:
        data = [item.model_dump(mode="json") for item in value]
    return json.dumps(data, indent=2, sort_keys=False)


def _truncate(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _progress(task: TaskInfo) -> str:
    p = task.progress or {}
    parts = []
    if p.get("epoch") is not None:
        parts.append(f"epoch {p['epoch']}" + (f"/{p['epochs']}" if p.get("epochs") is not None else ""))
    if p.get("step") is not None:
        parts.append(f"step {p['step']}" + (f"/{p['steps']}" if p.get("steps") is not None else ""))
    if isinstance(p.get("loss"), (int, float)):
        parts.append(f"loss {p['loss']:.4f}")
    return " ".join(parts)


def format_prediction(prediction: Prediction, names: Sequence[str]) -> str:
    mixed = prediction.mixed_versions
    header = (
        "model versions " + ", ".join(str(v) for v in prediction.model_versions)
        if mixed
        else f"model version {prediction.model_version}"
        + (f" (sha256 {prediction.snapshot_sha256[:12]})" if prediction.snapshot_sha256 else "")
    )
    rows = []
    for name, result in zip(names, prediction.results, strict=True):
        if not result.predictions:
            rows.append([name, "", "(no labels)", "", "", *([result.model_version] if mixed else [])])
        for rank, label in enumerate(result.predictions, 1):
            rows.append(
                [
                    name if rank == 1 else "",
                    rank,
                    label.label,
                    f"{label.score:.3f}",
                    label.task or "",
                    *([result.model_version] if mixed else []),
                ]
            )
    headers = ["IMAGE", "#", "LABEL", "SCORE", "TASK", *(["VERSION"] if mixed else [])]
    return header + "\n" + _table(headers, rows)


def format_tasks(tasks: Sequence[TaskInfo]) -> str:
    if not tasks:
        return "no tasks"
    rows = [
        [t.id, t.name, t.kind, t.status, "" if t.version is None else t.version, _progress(t), _truncate(t.error)]
        for t in tasks
    ]
    return _table(["ID", "NAME", "KIND", "STATUS", "VERSION", "PROGRESS", "ERROR"], rows)


def format_task(task: TaskInfo) -> str:
    lines = [
        f"id        {task.id}",
        f"name      {task.name}",
        f"kind      {task.kind}",
        f"status    {task.status}",
        f"version   {'' if task.version is None else task.version}",
        f"progress  {_progress(task)}",
    ]
    if task.classes:
        lines.append(f"classes   {', '.join(task.classes)}")
    for key, value in (task.metrics or {}).items():
        lines.append(f"metric    {key} = {value:.4f}" if isinstance(value, float) else f"metric    {key} = {value}")
    if task.error:
        lines.append(f"error     {task.error}")
    return "\n".join(lines)


_CARD_KEYS = ("final_accuracy", "average_incremental_accuracy", "forgetting")


def _card_value(version: VersionInfo, key: str) -> str:
    value = version.card.get(key) if isinstance(version.card, dict) else None
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def format_models(info: ModelsInfo) -> str:
    header = f"live {info.live}  serving {info.serving}"
    if not info.versions:
        return header + "\nno versions"
    rows = []
    for v in info.versions:
        rows.append(
            [
                v.version,
                v.state or "",
                "*" if v.version == info.serving else "",
                ", ".join(v.tasks),
                *(_card_value(v, key) for key in _CARD_KEYS),
                (v.sha256 or "")[:12],
            ]
        )
    headers = ["VERSION", "STATE", "SERVED", "TASKS", "FINAL_ACC", "AVG_INC_ACC", "FORGETTING", "SHA256"]
    return header + "\n" + _table(headers, rows)


def _parse_prompt(prompt: str) -> str | dict[str, str]:
    if prompt in ("auto", "none"):
        return prompt
    return {"task": prompt.removeprefix("task:")}


# -- commands ----------------------------------------------------------------------------------------------


def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files", exists=True, dir_okay=False, readable=True)],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels per image")] = 5,
    prompt: Annotated[str, typer.Option(help="auto, none, or a task name (task:NAME)")] = "auto",
    version: Annotated[int | None, typer.Option("--version", help="Model version (default: the live one)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per request")] = 32,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    admin_key: AdminKeyOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Classify images with the live model (or --version)."""
    with _client(url, api_key, admin_key, timeout) as client:
        result = client.predict(
            [str(p) for p in images], top_k=top_k, prompt=_parse_prompt(prompt), version=version, batch_size=batch_size
        )
    typer.echo(_dump(result) if as_json else format_prediction(result, [str(p) for p in images]))


def submit(
    path: Annotated[Path, typer.Argument(help="A folder (one sub-folder per class) or a zip/tar archive", exists=True)],
    name: Annotated[str | None, typer.Option("--name", "-n", help="Task name (default: the path's name)")] = None,
    kind: Annotated[str, typer.Option("--kind", help="class (new classes) or domain (new domain)")] = "class",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the task's version is live")] = False,
    until: Annotated[str, typer.Option("--until", help="With --wait: live or published")] = "live",
    wait_timeout: Annotated[float, typer.Option("--wait-timeout", help="With --wait: seconds to wait")] = 3600.0,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key", help="Reuse to make a retry safe")] = None,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    admin_key: AdminKeyOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Upload a new task (admin key). With --wait, follow it until its version is live."""
    if kind not in ("class", "domain"):
        raise typer.BadParameter("must be 'class' or 'domain'", param_hint="--kind")
    if until not in ("live", "published"):
        raise typer.BadParameter("must be 'live' or 'published'", param_hint="--until")
    task_name = name or path.resolve().name.split(".")[0]
    with _client(url, api_key, admin_key, timeout) as client:
        submitted = client.submit_task(path, name=task_name, kind=kind, idempotency_key=idempotency_key)
        if not wait:
            typer.echo(_dump(submitted) if as_json else f"submitted task {submitted.id} ({submitted.status})")
            return
        if not as_json:
            typer.echo(f"submitted task {submitted.id}; waiting until {until}", err=True)

        def report(task: TaskInfo) -> None:
            typer.echo(f"  {task.status} {_progress(task)}".rstrip(), err=True)

        task = client.wait_for_task(
            submitted.id,
            until=until,  # type: ignore[arg-type]
            timeout=wait_timeout,
            on_update=None if as_json else report,
        )
    typer.echo(_dump(task) if as_json else format_task(task))


def tasks(
    task_id: Annotated[str | None, typer.Argument(help="Show one task in detail")] = None,
    status: Annotated[str | None, typer.Option("--status", help="Only tasks in this status")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most this many")] = None,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    admin_key: AdminKeyOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """List tasks (newest first), or show one."""
    with _client(url, api_key, admin_key, timeout) as client:
        if task_id is not None:
            task = client.get_task(task_id)
            typer.echo(_dump(task) if as_json else format_task(task))
            return
        items = client.list_tasks(limit=limit, status=status)
    typer.echo(_dump(items) if as_json else format_tasks(items))


def models(
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    admin_key: AdminKeyOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """List published versions with their evaluation cards; which is live and which this server serves."""
    with _client(url, api_key, admin_key, timeout) as client:
        info = client.models()
    typer.echo(_dump(info) if as_json else format_models(info))


def activate(
    version: Annotated[int, typer.Argument(help="The version to make live", min=1)],
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    admin_key: AdminKeyOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Make a version live: roll back or forward (admin key)."""
    with _client(url, api_key, admin_key, timeout) as client:
        result = client.activate(version)
    if as_json:
        typer.echo(_dump(result))
        return
    typer.echo(f"version {result.live} is live; this server serves {result.serving}")
    if result.warning:
        typer.echo(f"warning: {result.warning}", err=True)


COMMANDS: dict[str, Callable[..., None]] = {
    "predict": predict,
    "submit": submit,
    "tasks": tasks,
    "models": models,
    "activate": activate,
}


def register(app: typer.Typer) -> None:
    """Add the client commands to a typer app (the ``fmlora.commands`` entry point)."""
    for name, command in COMMANDS.items():
        app.command(name)(command)


app = typer.Typer(
    name="fmlora-client",
    help="Talk to an fmlora server: predict, submit tasks, list tasks and models, activate versions.",
    no_args_is_help=True,
    add_completion=False,
)
register(app)


def main() -> None:
    """Console script ``fmlora-client``."""
    app(prog_name="fmlora-client")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
