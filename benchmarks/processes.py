"""Processes: a real server as a child process, thread limits, and what a process uses (resident
memory, GPU memory, CPU seconds, the server's own /metrics)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks import REPO

__all__ = [
    "ServerError",
    "ServerProcess",
    "child_env",
    "free_port",
    "gpu_memory_bytes",
    "limit_threads",
    "process_cpu_seconds",
    "rss_bytes",
    "scrape_metrics",
]

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _thread_env(env: dict[str, str] | os._Environ[str], n: int) -> None:
    for var in _THREAD_VARS:
        env[var] = str(n)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def limit_threads(n: int | None) -> None:
    """Limit this process's (and its children's) CPU threads; None leaves everything as it is."""
    if n is None:
        return
    _thread_env(os.environ, n)
    try:
        import torch

        torch.set_num_threads(n)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(max(1, min(n, 2)))
    except ImportError:
        pass


def child_env(threads: int | None = None, **extra: str) -> dict[str, str]:
    """The environment for a child process: offline hub, no progress bars, optional thread limits,
    the repository on PYTHONPATH (so ``server`` and ``fmlora`` import from this checkout)."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TQDM_DISABLE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    paths = [str(REPO), str(REPO / "clients")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if threads is not None:
        _thread_env(env, threads)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes (from /proc; None if unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:
        return None


def _nvidia_smi(query: str) -> str:
    return subprocess.run(
        ["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20, check=True
    ).stdout


def gpu_memory_bytes(pid: int | None = None) -> int | None:
    """GPU memory used by ``pid`` (or by all processes when None), from nvidia-smi; None without it."""
    try:
        if pid is None:
            return sum(int(float(x)) for x in _nvidia_smi("--query-gpu=memory.used").split()) * 2**20
        out = _nvidia_smi("--query-compute-apps=pid,used_memory")
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            with contextlib.suppress(ValueError):
                return int(float(parts[1])) * 2**20
    return None


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far (from /proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, ValueError, IndexError):
        return None


def scrape_metrics(url: str, timeout: float = 10.0) -> dict[str, float]:
    """GET /metrics → ``{"name{labels}": value}`` (Prometheus text format; comments skipped)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError):
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


# -- a real server ------------------------------------------------------------------------------------
class ServerError(RuntimeError):
    """The server process did not start, or died."""


def _server_cli_available() -> bool:
    try:
        from importlib.metadata import entry_points

        names = {e.name for e in entry_points(group="fmlora.commands")}
    except Exception:
        return False
    return "server" in names and (REPO / "server" / "cli.py").is_file()


_UVICORN_LAUNCHER = """
import sys, uvicorn
from server.api.app import create_app
from server.api.settings import Settings
settings = Settings()
uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
            access_log=False, timeout_graceful_shutdown=int(settings.shutdown_timeout_s))
"""


class ServerProcess:
    """``fmlora serve`` (or uvicorn on ``server.api.app:create_app`` where the CLI is absent) as a child
    process on a free loopback port, with no embedded worker.

    ``settings``: Settings fields (``max_queue=16``, ``device="cuda"``, ...), passed as ``FMLORA_*``
    environment variables. An admin key is generated unless given. ``launcher``: ``auto`` (the CLI
    when installed, else uvicorn), ``cli`` or ``uvicorn``. Use as a context manager, or ``start()`` /
    ``stop()``; ``log_tail()`` shows the server's last output lines.
    """

    def __init__(
        self,
        home: str | Path,
        *,
        settings: Mapping[str, Any] | None = None,
        threads: int | None = None,
        launcher: str = "auto",
        log_path: str | Path | None = None,
        ready_timeout_s: float = 300.0,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if launcher not in ("auto", "cli", "uvicorn"):
            raise ValueError("launcher must be auto, cli or uvicorn")
        self.home = Path(home)
        self.settings = dict(settings or {})
        self.settings.setdefault("admin_key", "bench-" + secrets.token_hex(16))
        self.settings.setdefault("log_level", "warning")
        self.settings["embedded_worker"] = False
        self.admin_key = str(self.settings["admin_key"])
        self.threads = threads
        self.launcher = launcher
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_timeout_s = ready_timeout_s
        self.extra_env = dict(env or {})
        self._own_log = log_path is None
        self.log_path = (
            Path(log_path)
            if log_path is not None
            else Path(tempfile.mkstemp(prefix="fmlora-server-", suffix=".log")[1])
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_in_s: float | None = None
        self.used_launcher: str | None = None
        self._launched_at = 0.0

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServerError("the server is not started")
        return self.proc.pid

    def command(self) -> list[str]:
        use_cli = self.launcher == "cli" or (self.launcher == "auto" and _server_cli_available())
        self.used_launcher = "cli" if use_cli else "uvicorn"
        if use_cli:
            return [
                sys.executable,
                "-m",
                "fmlora.cli",
                "serve",
                "--home",
                str(self.home),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-worker",
            ]
        return [sys.executable, "-c", _UVICORN_LAUNCHER]

    def _env(self) -> dict[str, str]:
        values = {"home": str(self.home), "host": "127.0.0.1", "port": str(self.port), **self.settings}
        extra = {}
        for key, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, (list, dict)):
                text = json.dumps(value)
            else:
                text = str(value)
            extra[f"FMLORA_{key.upper()}"] = text
        extra.update(self.extra_env)
        return child_env(self.threads, **extra)

    def start(self, wait: bool = True) -> ServerProcess:
        """Launch the server; with ``wait`` (default) return once GET /readyz answers 200. With
        ``wait=False`` return at once (do other set-up meanwhile) and call ``wait_ready()`` later."""
        if self.proc is not None:
            raise ServerError("the server is already started")
        self._launched_at = time.perf_counter()
        cmd = self.command()
        log = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=self._env(), stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> ServerProcess:
        """Block until GET /readyz answers 200 (ServerError if the process exits or the time runs out)."""
        if self.proc is None:
            raise ServerError("the server is not started")
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"the server exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if self.get("/readyz")[0] == 200:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"the server was not ready within {self.ready_timeout_s:g} s:\n{self.log_tail()}")
            time.sleep(0.1)
        if self.started_in_s is None:
            self.started_in_s = time.perf_counter() - self._launched_at
        return self

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """A plain GET (status, body); status 0 when the server does not answer."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (OSError, urllib.error.URLError):
            return 0, b""

    def get_json(self, path: str, timeout: float = 5.0) -> Any:
        status, body = self.get(path, timeout)
        if status != 200:
            raise ServerError(f"GET {path} answered {status}: {body[:300]!r}")
        return json.loads(body)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful drain), SIGKILL after ``timeout_s``; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_log and exc[0] is None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
