"""``fmlora demo``: the system doing its main job, observed only through the HTTP API.

Submits the offline glyph benchmark's tasks one after another to a server (one it starts, with an
embedded worker, unless ``--url`` names a running one), waits for each to go live, then measures the
accuracy on every task seen so far through ``POST /predict`` on held-out images the server never saw.
The table after each task shows that the model learns new tasks, keeps old ones, and never grows.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

__all__ = ["DemoResult", "register", "run_demo"]


def class_label(character: str) -> str:
    """A folder- and human-friendly label: the character itself, or its Unicode name for symbols."""
    return character if character.isalnum() else unicodedata.name(character).lower()


@dataclass
class DemoResult:
    tasks: list[str]
    versions: list[int]
    accuracy: list[list[float]]  # row t: accuracy on tasks 0..t after task t went live
    adapter_bytes: list[int]
    seconds_to_live: list[float]
    # From the server answering ready to a training worker holding the lease (a worker process
    # starting up: imports and registry), measured apart so submit-to-live is that of a running system.
    seconds_to_worker: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "versions": self.versions,
            "accuracy_matrix": self.accuracy,
            "average_accuracy": [sum(r) / len(r) for r in self.accuracy],
            "adapter_bytes": self.adapter_bytes,
            "seconds_to_live": self.seconds_to_live,
            "seconds_to_worker": self.seconds_to_worker,
        }


class _ProgressPrinter:
    """Prints a task's life once per epoch and per status change, not once per poll."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.last: tuple[str, int] = ("", 0)

    def __call__(self, info: Any) -> None:
        epoch = int(info.progress.get("epoch", 0) or 0)
        if (info.status, epoch) == self.last:
            return
        self.last = (info.status, epoch)
        if info.status == "training" and epoch:
            loss = float(info.progress.get("loss", 0.0))
            self.echo(f"  training epoch {epoch}/{info.progress.get('epochs')} loss {loss:.3f}")
        elif info.status != "training":
            self.echo(f"  {info.status}")


def _table(result: DemoResult) -> str:
    width = max(8, *(len(t) for t in result.tasks))
    header = f"{'version':>7}  " + "  ".join(f"{t:>{width}}" for t in result.tasks) + f"  {'mean':>6}  adapter bytes"
    lines = [header, "-" * len(header)]
    for version, row, size in zip(result.versions, result.accuracy, result.adapter_bytes, strict=True):
        cells = [f"{100 * a:>{width - 1}.1f}%" for a in row] + [" " * width] * (len(result.tasks) - len(row))
        lines.append(f"v{version:<6}  " + "  ".join(cells) + f"  {100 * sum(row) / len(row):>5.1f}%  {size:,}")
    return "\n".join(lines)


def _plot(result: DemoResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for j, task in enumerate(result.tasks):
        xs = result.versions[j:]
        ax.plot(xs, [row[j] * 100 for row in result.accuracy[j:]], marker="o", ms=3, lw=1, label=task)
    mean = [100 * sum(r) / len(r) for r in result.accuracy]
    ax.plot(result.versions, mean, color="black", lw=2.5, label="mean over seen tasks")
    ax.set_xlabel("live version (one per task learned)")
    ax.set_ylabel("accuracy through POST /predict (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Held-out accuracy per task as new tasks go live")
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(
    url: str,
    admin_key: str | None,
    out: Path,
    *,
    num_tasks: int = 10,
    stream_tasks: int | None = None,
    kind: str = "class",
    train_per_class: int = 40,
    test_per_class: int = 20,
    seed: int = 0,
    task_timeout_s: float = 3600.0,
    worker_timeout_s: float = 300.0,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Submit the glyph benchmark task by task to ``url`` and measure it through the API.

    ``stream_tasks``: split the benchmark into this many tasks and submit the first ``num_tasks``
    (default: split into ``num_tasks``)."""
    import numpy as np
    from fmlora_client import Client

    from fmlora.data.archive import write_task_archive
    from fmlora.data.glyphs import make_glyph_stream
    from fmlora.data.images import ImageSet, batches

    out.mkdir(parents=True, exist_ok=True)
    stream = make_glyph_stream(
        kind, stream_tasks or num_tasks, train_per_class=train_per_class, test_per_class=test_per_class, seed=seed
    )[:num_tasks]
    result = DemoResult([], [], [], [], [])
    held_out: list[tuple[np.ndarray, list[str]]] = []
    with Client(url, admin_key=admin_key, api_key=admin_key) as client, tempfile.TemporaryDirectory() as scratch:
        client.wait_ready(timeout=300)
        result.seconds_to_worker = _wait_for_worker(client, worker_timeout_s, echo)
        for task in stream:
            labels = tuple(class_label(c) for c in task.classes)
            train = next(iter(batches(task.train, len(task.train))))
            archive = write_task_archive(ImageSet(train[0], train[1], labels), Path(scratch) / f"{task.name}.zip")
            images, targets = next(iter(batches(task.test, len(task.test))))
            held_out.append((images.permute(0, 2, 3, 1).numpy(), [labels[i] for i in targets.tolist()]))

            name = f"glyphs-{len(result.tasks)}" if kind == "class" else task.name
            started = time.monotonic()
            submitted = client.submit_task(archive, name=name, kind=kind)
            echo(f"submitted {name} ({len(labels)} classes, {len(task.train)} images) as task {submitted.id}")
            show = _ProgressPrinter(echo)

            done = client.wait_for_task(
                submitted.id, until="live", timeout=task_timeout_s, on_update=show, poll_interval=0.2
            )
            result.seconds_to_live.append(round(time.monotonic() - started, 1))
            models = client.models()
            live = next(v for v in models.versions if v.version == done.version)
            row = []
            for pixels, truth in held_out:
                prediction = client.predict(pixels, top_k=1)
                hits = sum(r.predictions[0].label == t for r, t in zip(prediction.results, truth, strict=True))
                row.append(hits / len(truth))
            result.tasks.append(name)
            result.versions.append(int(done.version or 0))
            result.accuracy.append(row)
            result.adapter_bytes.append(int(live.adapter_bytes or 0))
            echo("")
            echo(_table(result))
            echo("")
    (out / "demo.json").write_text(json.dumps(result.as_dict(), indent=2))
    _plot(result, out / "demo-accuracy.png")
    echo(f"wrote {out / 'demo.json'} and {out / 'demo-accuracy.png'}")
    return result


def _wait_for_worker(client: Any, timeout_s: float, echo: Callable[[str], None]) -> float:
    """Seconds until a training worker holds the lease (``GET /info``); a task submitted before then
    would only wait in the queue, so the demo's submit-to-live clock starts with a worker attached."""
    started = time.monotonic()
    waiting_said = False
    while (worker := client.info().training_worker) is None:
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"no training worker took the lease within {timeout_s:.0f} s; is one running?")
        if not waiting_said:
            echo("waiting for a training worker to attach ...")
            waiting_said = True
        time.sleep(0.2)
    waited = round(time.monotonic() - started, 1)
    echo(f"training worker {worker} attached ({waited} s after the server was ready)")
    return waited


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(home: Path, port: int, admin_key: str, log_path: Path) -> subprocess.Popen[bytes]:
    """``fmlora serve`` (server plus embedded worker) as a child process, logging to ``log_path``."""
    env = {**os.environ, "FMLORA_ADMIN_KEY": admin_key}
    command = [sys.executable, "-m", "fmlora.cli", "serve", "--home", str(home), "--port", str(port)]
    log = log_path.open("wb")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_server(process: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        url: str | None = typer.Option(
            None, envvar="FMLORA_URL", help="A running server; by default the demo starts one (with a worker)."
        ),
        admin_key: str | None = typer.Option(None, envvar="FMLORA_ADMIN_KEY", help="Admin key of --url's server."),
        home: Path | None = typer.Option(
            None, help="FMLORA_HOME for the server the demo starts (default: a new temporary one)."
        ),
        keep_home: bool = typer.Option(
            False, help="Keep the temporary home the demo made (its registry, snapshots, uploaded images)."
        ),
        tasks: int = typer.Option(10, min=1, max=100, help="How many glyph tasks to submit."),
        kind: str = typer.Option("class", help="'class' (10 new classes a task) or 'domain' (a new typeface)."),
        out: Path = typer.Option(Path("runs/demo"), help="Where demo.json, the PNG and the server log go."),
        seed: int = typer.Option(0),
    ) -> None:
        """Submit the offline benchmark's tasks through the API and show accuracy on every task after each."""
        out.mkdir(parents=True, exist_ok=True)
        process = None
        made_home: Path | None = None
        if url is None:
            if home is None:
                # A home of its own holds a copy of every uploaded image and each snapshot (about
                # 1 GB after ten tasks): removed afterwards unless asked, or every run leaks it.
                home = made_home = Path(tempfile.mkdtemp(prefix="fmlora-demo-home-"))
            admin_key = admin_key or secrets.token_urlsafe(24)
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            typer.echo(f"starting fmlora serve on {url} (home {home}, log {out / 'server.log'})")
            process = start_server(home, port, admin_key, out / "server.log")
        try:
            run_demo(url, admin_key, out, num_tasks=tasks, kind=kind, seed=seed, echo=typer.echo)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            if process is not None and process.poll() is not None:
                typer.echo(f"the server exited ({process.returncode}); see {out / 'server.log'}", err=True)
            typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
            raise typer.Exit(1) from None
        finally:
            if process is not None:
                code = stop_server(process)
                typer.echo(f"server stopped (exit code {code})")
            if made_home is not None:
                if keep_home:
                    typer.echo(f"kept the server's home {made_home}")
                else:
                    shutil.rmtree(made_home, ignore_errors=True)
