"""``fmlora serve``: the server plus an embedded training worker, in one command.

Registered into the ``fmlora`` CLI through the ``fmlora.commands`` entry point (fmlora never imports
the server), and runnable alone as ``python -m server serve``.

Shutdown (Ctrl-C or SIGTERM): uvicorn stops accepting connections and lets in-flight requests finish
(up to FMLORA_SHUTDOWN_TIMEOUT_S), the lifespan stops the engine, then the worker is asked to stop
(a task mid-training goes back to the queue) and joined; the process exits 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import typer
from pydantic import SecretStr, ValidationError

from fmlora.errors import FmloraError
from server.api.settings import EmbeddedWorkerSettings, Settings

__all__ = ["ADMIN_KEY_FILE", "load_or_create_admin_key", "openapi_document", "register", "serve"]

log = logging.getLogger("fmlora.server")

ADMIN_KEY_FILE = "admin.key"


def load_or_create_admin_key(home: Path) -> tuple[str, bool]:
    """The admin key stored in ``home`` (created with mode 0600 on first use): (key, created)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / ADMIN_KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("%s was readable by others (mode %o); tightened to 0600", path, mode)
        key = path.read_text(encoding="ascii").strip()
        if len(key) < 16:
            raise FmloraError(f"{path} does not hold a valid admin key; delete it to generate a new one") from None
        return key, False
    key = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key + "\n")
    return key, True


def openapi_document() -> str:
    """The app's OpenAPI schema as committed in openapi.json (sorted keys, 2-space indent)."""
    from server.api.app import create_app

    # The schema does not depend on settings; a throw-away key keeps the "no admin key" warning quiet.
    app = create_app(Settings(admin_key=secrets.token_urlsafe(32), api_key=None, cors_origins=[]))
    return json.dumps(app.openapi(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says it is TCP; without it every response waits ~40 ms for Nagle/delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise FmloraError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class EmbeddedWorker:
    """``fmlora worker`` as a supervised child process of ``serve``.

    A child, not a thread: training in the server process would contend for the GIL and torch's
    thread pool with inference, and a crash in training must not take the server down. The child
    reads the same FMLORA_* variables (EmbeddedWorkerSettings) from the inherited environment; if it
    dies it is restarted after a pause, and stopping sends SIGTERM (its task is requeued) then waits.
    """

    restart_delay_s = 5.0

    def __init__(self, home: Path, registry_url: str | None = None, store_url: str | None = None):
        EmbeddedWorkerSettings()  # fail fast, in the parent, on invalid FMLORA_WORKER_* values
        # --parent-pid: the worker ends when this process does, even by SIGKILL (a parent-death signal
        # plus a watch), so an orphan never keeps the lease. Its own session still keeps a Ctrl-C in
        # the terminal from reaching it before the server has drained.
        self.command = [
            sys.executable,
            "-m",
            "fmlora.cli",
            "worker",
            "--home",
            str(home),
            "--parent-pid",
            str(os.getpid()),
        ]
        # Secrets in a URL travel in the child's environment, not on its command line (ps shows that).
        self.env = dict(os.environ)
        if registry_url:
            self.env["FMLORA_REGISTRY_URL"] = registry_url
        if store_url:
            self.env["FMLORA_STORE_URL"] = store_url
        self._stopping = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._supervisor = threading.Thread(target=self._supervise, name="fmlora-worker-supervisor", daemon=True)

    def start(self) -> None:
        self._supervisor.start()

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                if self._stopping.is_set():
                    return
                # Started from this long-lived thread: the worker's parent-death signal fires when the
                # thread that forked it ends (PR_SET_PDEATHSIG is per thread).
                self._process = subprocess.Popen(self.command, start_new_session=True, env=self.env)
            code = self._process.wait()
            if self._stopping.is_set():
                return
            log.error("the embedded worker exited with code %s; restarting in %.0f s", code, self.restart_delay_s)
            self._stopping.wait(self.restart_delay_s)

    def stop(self, timeout: float) -> None:
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("the embedded worker did not stop in time; killing it (its task will be requeued)")
                process.kill()
                process.wait()
        self._supervisor.join(timeout=5.0)


def worker_store_url(settings: Settings) -> str | None:
    """The store URL for the embedded worker: the server's S3 options ride in the URL's query (the
    worker reads FMLORA_STORE_URL alone; credentials stay in the inherited AWS variables)."""
    url = settings.store_url
    if not url or not url.startswith("s3://"):
        return url
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    extra = {
        "endpoint_url": settings.s3_endpoint_url,
        "region": settings.s3_region,
        "addressing_style": settings.s3_addressing_style,
    }
    query.update({k: v for k, v in extra.items() if v and k not in query})
    return urlunsplit(parts._replace(query=urlencode(query)))


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def serve(
    home: Path | None = typer.Option(None, help="Registry directory (env FMLORA_HOME; default ./fmlora-home)."),
    host: str | None = typer.Option(None, help="Interface (env FMLORA_HOST; default 127.0.0.1)."),
    port: int | None = typer.Option(None, min=0, max=65535, help="Port, 0 = any free (env FMLORA_PORT; 8000)."),
    worker: bool | None = typer.Option(
        None, "--worker/--no-worker", help="Also train queued tasks in this process (env FMLORA_EMBEDDED_WORKER; on)."
    ),
    device: str | None = typer.Option(None, help="Inference device: auto, cpu, cuda, cuda:N (env FMLORA_DEVICE)."),
    backbone: str | None = typer.Option(
        None, help="timm model for a NEW home (env FMLORA_BACKBONE; default: the offline glyph ViT)."
    ),
    backbone_weights: str | None = typer.Option(
        None, help="'pretrained', 'random' or a weight file, for --backbone (env FMLORA_BACKBONE_WEIGHTS)."
    ),
    log_level: str | None = typer.Option(None, help="critical, error, warning, info, debug (env FMLORA_LOG_LEVEL)."),
) -> None:
    """Run the HTTP server (and, by default, a training worker) on one registry home.

    Prints the API and docs URLs and the admin key: FMLORA_ADMIN_KEY if set, else a key generated
    once and kept in HOME/admin.key (mode 0600). Every other setting comes from FMLORA_* variables.
    """
    import uvicorn

    from server.api.app import create_app, open_registry

    given = {
        "home": home,
        "host": host,
        "port": port,
        "device": device,
        "backbone": backbone,
        "backbone_weights": backbone_weights,
        "log_level": log_level,
        "embedded_worker": worker,
    }
    overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        typer.echo(f"error: invalid settings: {problems}", err=True)
        raise typer.Exit(2) from None

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=False
    )
    try:
        key_note = ""
        if settings.auth_disabled:
            key_note = "authentication DISABLED (FMLORA_AUTH_DISABLED); use only on a trusted machine"
        elif settings.admin_key is None:
            key, created = load_or_create_admin_key(settings.home)
            settings = settings.model_copy(update={"admin_key": SecretStr(key)})
            where = settings.home.resolve() / ADMIN_KEY_FILE
            key_note = f"{key}  ({'generated, ' if created else ''}stored in {where}, mode 0600)"
        else:
            secret = settings.admin_key.get_secret_value()
            fingerprint = hashlib.sha256(secret.encode()).hexdigest()[:12]
            key_note = f"from FMLORA_ADMIN_KEY (sha256 {fingerprint}…; the key itself is never printed)"
        registry = open_registry(settings)
        sock = _bind(settings.host, settings.port)
    except (FmloraError, OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    bound_port = sock.getsockname()[1]
    base = f"http://{_display_host(settings.host)}:{bound_port}"
    app = create_app(settings, registry=registry, freeze_gc_at_start=True)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)),
        lifespan="on",
        server_header=False,
        date_header=True,
    )
    server = uvicorn.Server(config)

    embedded = None
    if settings.embedded_worker:
        try:
            embedded = EmbeddedWorker(registry.home, registry.registry_url, worker_store_url(settings))
        except ValidationError as exc:
            typer.echo(f"error: invalid worker settings: {exc.error_count()} problem(s): {exc}", err=True)
            raise typer.Exit(2) from None
        embedded.start()

    lines = [
        f"fmlora serving {registry.home} ({registry.model_config.backbone.name})",
        f"  API:       {base}",
        f"  docs:      {base}/docs",
        f"  admin key: {key_note}",
        f"  worker:    {'embedded child process' if embedded else 'off (run `fmlora worker`)'}",
        "Press Ctrl-C to stop.",
    ]
    typer.echo("\n".join(lines))
    sys.stdout.flush()

    # uvicorn handles SIGINT/SIGTERM (graceful: stop accepting, finish in-flight requests), then
    # re-raises the signal it caught with the handlers installed before it: ours, which only note it,
    # so the process cleans up below and exits 0 instead of dying by the signal.
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _f: caught.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        if embedded is not None:
            embedded.stop(timeout=max(5.0, settings.shutdown_timeout_s))
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        typer.echo("error: the server failed to start; see the log above", err=True)
        raise typer.Exit(1)
    typer.echo("fmlora stopped")


def register(app: typer.Typer) -> None:
    """Entry point of the ``fmlora.commands`` group: adds ``serve`` to the ``fmlora`` CLI."""
    app.command("serve")(serve)
