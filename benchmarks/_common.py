"""Helpers shared by the benchmark scripts (perf, load, swap, soak, fuzz).

Import from a script in ``benchmarks/`` with::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
    from benchmarks._common import ...

What is here (a stable API: other scripts import it):

* results: ``machine_info()``, ``write_json(path, payload)`` (adds ``machine`` and ``command``),
  ``summarize(latencies_s)``, ``percentile(values, q)``, ``ratio(a, b)``
* processes: ``limit_threads(n)``, ``child_env(threads, **extra)``, ``free_port()``, ``rss_bytes(pid)``,
  ``gpu_memory_bytes(pid)``
* models and homes: ``backbone_config(name, weights_dir)``, ``model_config(name, weights_dir)``,
  ``learn_quickly(model, name, classes, seed)``, ``publish_version(registry, model, task)``,
  ``make_home(home, backbone, tasks=2, ...)`` → ``BenchHome``
* a real server: ``ServerProcess(home, settings={...}).start()`` (context manager), ``.url``,
  ``.pid``, ``.admin_key``, ``.log_tail()``; ``start(wait=False)`` + ``wait_ready()`` overlap its
  start-up with other set-up
* images and requests: ``random_images(n, size, seed)``, ``encode_image(array, fmt)``,
  ``predict_body(blobs, top_k, prompt)``
* HTTP load: ``http_load(url, body, concurrency=.., seconds=..)`` (closed loop, asyncio httpx) →
  ``LoadResult`` (status counts, latencies of 200s, Retry-After seen, client timeouts);
  ``scrape_metrics(url)`` → ``{"name{labels}": value}`` from GET /metrics
* plots: ``plot_bars(path, groups, series, ...)``, ``plot_lines(path, x, series, ...)``

Every result file says which machine, torch, commit and command produced it. Benchmarks measure; they
never assert speed (the tests under tests/integration/bench assert the output's shape only).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as _dt
import io
import json
import math
import os
import platform
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]

__all__ = [
    "REPO",
    "BenchHome",
    "LoadResult",
    "ServerError",
    "ServerProcess",
    "backbone_config",
    "child_env",
    "encode_image",
    "free_port",
    "git_commit",
    "gpu_memory_bytes",
    "http_load",
    "http_load_async",
    "learn_quickly",
    "limit_threads",
    "machine_info",
    "make_home",
    "model_config",
    "percentile",
    "plot_bars",
    "plot_lines",
    "predict_body",
    "process_cpu_seconds",
    "publish_version",
    "random_images",
    "ratio",
    "rss_bytes",
    "scrape_metrics",
    "summarize",
    "write_json",
]

# Backbone names accepted besides timm names: the shipped glyph ViT and the tests' tiny ViT.
TINY_KWARGS: dict[str, Any] = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}
_ALIASES = {"offline", "tiny"}


# -- results ---------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> dict[str, Any]:
    """HEAD's commit and whether tracked files differ from it (figures from a dirty tree say so)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return {"commit": sha, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, load, Python, torch, CUDA/GPU, date, git commit."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    with contextlib.suppress(OSError, AttributeError):
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, AttributeError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_bytes"] = int(line.split()[1]) * 1024
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["cuda"] = torch.version.cuda
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        info["torch"] = None
    for name in ("timm", "numpy", "fastapi", "uvicorn", "httpx", "onnxruntime"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    info["git"] = git_commit()
    return info


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf → None, Paths → str, tuples → lists, numpy scalars → Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, payload: Mapping[str, Any], *, machine: bool = True) -> Path:
    """Write ``payload`` (plus ``machine`` and ``command`` unless present) atomically as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(payload)
    if machine and "machine" not in data:
        data["machine"] = machine_info()
    data.setdefault("command", " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100, linear interpolation); NaN for no values."""
    if len(values) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize(latencies_s: Sequence[float]) -> dict[str, Any]:
    """Latency summary in milliseconds: n, mean, p50, p90, p99, max (None where there are no values)."""
    values = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    if values.size == 0:
        return {"n": 0, "mean_ms": None, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "n": int(values.size),
        "mean_ms": round(float(values.mean()), 3),
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p90_ms": round(float(np.percentile(values, 90)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
        "max_ms": round(float(values.max()), 3),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded to 3 places; None when either is missing or b is zero."""
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return round(a / b, 3)


# -- processes -------------------------------------------------------------------------------------
def limit_threads(n: int | None) -> None:
    """Limit this process's (and its children's) CPU threads; None leaves everything as it is."""
    if n is None:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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


def gpu_memory_bytes(pid: int | None = None) -> int | None:
    """GPU memory used by ``pid`` (or by all processes when None), from nvidia-smi; None without it."""
    try:
        if pid is None:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout
            return sum(int(float(x)) for x in out.split()) * 2**20
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            with contextlib.suppress(ValueError):
                return int(float(parts[1])) * 2**20
    return None


# -- models and registry homes -----------------------------------------------------------------------
def backbone_config(name: str, weights_dir: str | Path | None = None, *, weights: str = "random") -> Any:
    """A BackboneConfig for ``name``.

    ``offline``: the shipped glyph ViT (``ModelConfig()``'s default). ``tiny``: the tests' 32-px ViT.
    Any timm name: ``weights="random"`` (default) writes timm's seeded random initialisation to
    ``weights_dir/<name>.safetensors`` once and loads it from there, so every process (this one, the
    server, a worker) builds the same backbone and snapshots stay compatible; ``weights="pretrained"``
    uses timm's pretrained weights (from the local cache when HF_HUB_OFFLINE is set).
    """
    from fmlora.model import BackboneConfig

    if name == "offline":
        return BackboneConfig.offline()
    kwargs = dict(TINY_KWARGS) if name == "tiny" else {}
    timm_name = "vit_tiny_patch16_224" if name == "tiny" else name
    if weights == "pretrained":
        return BackboneConfig(name=timm_name, weights="pretrained", model_kwargs=kwargs)
    if weights != "random":
        raise ValueError(f"weights must be 'random' or 'pretrained', got {weights!r}")
    directory = Path(weights_dir) if weights_dir is not None else Path(tempfile.gettempdir()) / "fmlora-bench-weights"
    path = directory / f"{name.replace('/', '_')}-seed1234.safetensors"
    if not path.exists():
        import timm
        import torch
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(1234)
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(path)
    return BackboneConfig(name=timm_name, weights="file", weights_path=path, model_kwargs=kwargs)


def model_config(name: str, weights_dir: str | Path | None = None, *, weights: str = "random") -> Any:
    """ModelConfig for ``name`` (see ``backbone_config``); default adapter and prompt settings, except
    the tiny ViT, which uses the tests' small adapter and prompt bank."""
    from fmlora.model import AdapterConfig, ModelConfig, PromptConfig

    if name == "offline":
        return ModelConfig()
    backbone = backbone_config(name, weights_dir, weights=weights)
    if name == "tiny":
        return ModelConfig(
            backbone=backbone, adapter=AdapterConfig(rank=8, alpha=8), prompts=PromptConfig(bank_size=4, length=4)
        )
    return ModelConfig(backbone=backbone)


def learn_quickly(model: Any, name: str, classes: Sequence[str], seed: int = 0, kind: str = "class") -> None:
    """A task's life cycle without training: random factors, bank and head rows stand in for learning
    (the same tensors, shapes and code paths as a trained task; accuracy is meaningless)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    was_merged = bool(getattr(model, "merged", False))
    if was_merged:
        model.unmerge()
    model.begin_task(name, kind, list(classes), complexity=0.5, novelty=0.5, generator=g)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p) * 0.05)
    device = model.device
    mean = torch.randn(model.embed_dim, generator=g).to(device)
    key = torch.randn(model.embed_dim, generator=g).to(device)
    model.end_task(mean, key)
    if was_merged:
        model.merge()


def publish_version(registry: Any, model: Any, task_name: str, card: Mapping[str, Any] | None = None) -> int:
    """Save ``model``'s adapter as the registry's next version and make it live (as the worker does)."""
    from fmlora.registry.publish import publish_version as publish

    names = [t.name for t in model.tasks]
    card = dict(card) if card is not None else {"task": task_name, "tasks": names, "benchmark": True}
    return publish(registry, model, card=card, parent=registry.live_version()).version


@dataclass
class BenchHome:
    """A registry home with published versions, and the (CPU, unmerged) model that made them."""

    home: Path
    registry: Any
    model: Any
    config: Any
    versions: list[int] = field(default_factory=list)
    next_task: int = 0
    classes_per_task: int = 5

    def publish_task(self, seed: int | None = None) -> int:
        """Learn one more task (learn-quickly) and publish it as the next live version."""
        index = self.next_task
        name = f"task{index:03d}"
        classes = [f"t{index:03d}c{j}" for j in range(self.classes_per_task)]
        learn_quickly(self.model, name, classes, seed=index if seed is None else seed)
        version = publish_version(self.registry, self.model, name)
        self.versions.append(version)
        self.next_task += 1
        return version


def make_home(
    home: str | Path,
    backbone: str = "offline",
    *,
    tasks: int = 2,
    classes_per_task: int = 5,
    weights_dir: str | Path | None = None,
    weights: str = "random",
) -> BenchHome:
    """Create ``home`` on ``backbone`` (see ``backbone_config``) with ``tasks`` learned-quickly tasks,
    each published as a live version in turn (version ``tasks`` is live at the end)."""
    import torch

    from fmlora.model import FMLoRAModel
    from fmlora.registry.registry import Registry

    config = model_config(
        backbone, weights_dir if weights_dir is not None else Path(home).parent / "weights", weights=weights
    )
    registry = Registry.open(home, config)
    torch.manual_seed(0)
    model = FMLoRAModel(config).eval()
    bench = BenchHome(Path(home), registry, model, config, classes_per_task=classes_per_task)
    for _ in range(tasks):
        bench.publish_task()
    return bench


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


# -- images and requests ---------------------------------------------------------------------------
def random_images(n: int, size: int | tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """``n`` seeded RGB uint8 images of ``size`` (smooth noise: compresses like a photo, not like static)."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
        big = np.kron(small, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]
        if big.shape[:2] != (h, w):
            big = np.pad(big, ((0, h - big.shape[0]), (0, w - big.shape[1]), (0, 0)), mode="edge")
        noise = rng.integers(0, 16, size=(h, w, 3), dtype=np.uint8)
        images.append(np.ascontiguousarray(big // 16 * 15 + noise))
    return images


def encode_image(array: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> bytes:
    """An RGB uint8 array as JPEG or PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(array, "RGB")
    if fmt.lower() in ("jpeg", "jpg"):
        image.save(buf, "JPEG", quality=quality)
    elif fmt.lower() == "png":
        image.save(buf, "PNG")
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


def predict_body(blobs: Iterable[bytes], top_k: int = 5, prompt: Any = "auto", version: int | None = None) -> bytes:
    """The JSON body of POST /predict for encoded images (base64)."""
    body: dict[str, Any] = {
        "images": [base64.b64encode(b).decode("ascii") for b in blobs],
        "top_k": top_k,
        "prompt": prompt,
    }
    if version is not None:
        body["version"] = version
    return json.dumps(body).encode()


# -- HTTP load ---------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    """What a closed-loop HTTP load phase saw. ``statuses``: HTTP status → count (0 = no answer:
    ``client_timeouts`` + ``connection_errors``). ``latencies_s``: of 200 answers only."""

    concurrency: int
    wall_s: float
    images_per_request: int
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    error_latencies_s: list[float] = field(default_factory=list)
    retry_after: dict[int, int] = field(default_factory=dict)  # status → answers that carried Retry-After
    retry_after_values: list[float] = field(default_factory=list)
    client_timeouts: int = 0
    connection_errors: int = 0
    error_types: dict[str, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0
    # (seconds since ``t0`` when the answer came, status, latency seconds) when ``record_events``.
    events: list[tuple[float, int, float]] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def images_per_s(self) -> float:
        return self.ok * self.images_per_request / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "images_per_request": self.images_per_request,
            "wall_s": round(self.wall_s, 3),
            "requests": self.requests,
            "ok": self.ok,
            "requests_per_s": round(self.ok / self.wall_s, 3) if self.wall_s > 0 else None,
            "images_per_s": round(self.images_per_s, 3),
            "latency": summarize(self.latencies_s),
            "error_latency": summarize(self.error_latencies_s),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "retry_after": {str(k): v for k, v in sorted(self.retry_after.items())},
            "retry_after_max_s": max(self.retry_after_values) if self.retry_after_values else None,
            "client_timeouts": self.client_timeouts,
            "connection_errors": self.connection_errors,
            "error_types": dict(sorted(self.error_types.items())),
            "client_cpu_s": round(self.client_cpu_s, 3),
        }


async def http_load_async(
    url: str,
    body: bytes | Sequence[bytes],
    *,
    concurrency: int,
    seconds: float,
    images_per_request: int = 1,
    path: str = "/predict",
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
    reject_pause_s: float = 0.0,
    max_requests: int | None = None,
    min_requests_per_client: int = 0,
    record_events: bool = False,
    t0: float | None = None,
) -> LoadResult:
    """``concurrency`` clients each POST ``body`` (or the bodies in turn) back to back for ``seconds``.

    A client that gets 429/503 pauses ``reject_pause_s`` (0: none) before its next request, as a
    polite client would, instead of spinning on rejections. Requests started before the deadline are
    awaited and counted; ``wall_s`` runs to the last answer. Each client sends at least
    ``min_requests_per_client`` requests (``seconds=0, min_requests_per_client=1``: a warm-up), and all
    together at most ``max_requests``. ``record_events`` keeps every answer's (time since ``t0``
    (a ``time.perf_counter()`` value; default: the start), status, latency) for timelines.
    """
    import httpx

    bodies = [body] if isinstance(body, (bytes, bytearray)) else list(body)
    hdrs = {"content-type": "application/json", **(headers or {})}
    result = LoadResult(concurrency=concurrency, wall_s=0.0, images_per_request=images_per_request)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0))
    # Set when the client exists (building one takes tens of milliseconds: its SSL context).
    started = deadline = origin = 0.0
    counter = 0

    def note(status: int, latency: float) -> None:
        if record_events:
            result.events.append((time.perf_counter() - origin, status, latency))

    async def one_client(client: httpx.AsyncClient, index: int) -> None:
        nonlocal counter
        i = index
        sent = 0
        while (time.perf_counter() < deadline or sent < min_requests_per_client) and (
            max_requests is None or counter < max_requests
        ):
            counter += 1
            sent += 1
            payload = bodies[i % len(bodies)]
            i += concurrency
            t_req = time.perf_counter()
            try:
                resp = await client.post(url + path, content=payload, headers=hdrs)
            except httpx.TimeoutException:
                result.client_timeouts += 1
                result.statuses[0] = result.statuses.get(0, 0) + 1
                note(0, time.perf_counter() - t_req)
                continue
            except httpx.TransportError:
                result.connection_errors += 1
                result.statuses[0] = result.statuses.get(0, 0) + 1
                note(0, time.perf_counter() - t_req)
                await asyncio.sleep(0.05)
                continue
            elapsed = time.perf_counter() - t_req
            status = resp.status_code
            note(status, elapsed)
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status == 200:
                result.latencies_s.append(elapsed)
                continue
            result.error_latencies_s.append(elapsed)
            retry = resp.headers.get("retry-after")
            if retry is not None:
                result.retry_after[status] = result.retry_after.get(status, 0) + 1
                with contextlib.suppress(ValueError):
                    result.retry_after_values.append(float(retry))
            try:
                kind = str(resp.json()["error"]["type"])
            except Exception:
                kind = f"http_{status}"
            result.error_types[kind] = result.error_types.get(kind, 0) + 1
            if status in (429, 503) and reject_pause_s > 0:
                await asyncio.sleep(reject_pause_s)

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        started = time.perf_counter()
        origin = started if t0 is None else t0
        deadline = started + seconds
        cpu0 = time.process_time()
        await asyncio.gather(*(one_client(client, k) for k in range(concurrency)))
        result.wall_s = time.perf_counter() - started
        result.client_cpu_s = time.process_time() - cpu0
    return result


def http_load(url: str, body: bytes | Sequence[bytes], **kwargs: Any) -> LoadResult:
    """``http_load_async`` on a fresh event loop (see there for the arguments)."""
    return asyncio.run(http_load_async(url, body, **kwargs))


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


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far (from /proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, ValueError, IndexError):
        return None


# -- plots -----------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(
    path: str | Path,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str = "",
    ylabel: str = "",
    xlabel: str = "",
    annotate: Mapping[str, Sequence[str | None]] | None = None,
    log_y: bool = False,
) -> Path:
    """Grouped bars: one group per entry of ``groups``, one bar per series (None = no bar)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(1, len(series)) / 2), 4.2))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        heights = [np.nan if v is None else float(v) for v in values]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=name)
        labels = (annotate or {}).get(name)
        if labels:
            for bar, text in zip(bars, labels, strict=False):
                if text and np.isfinite(bar.get_height()):
                    ax.annotate(
                        text,
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                    )
    ax.set_xticks(x, list(groups))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    if log_y:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_lines(
    path: str | Path,
    x: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str = "",
    ylabel: str = "",
    xlabel: str = "",
    log_x: bool = False,
    log_y: bool = False,
    secondary: Mapping[str, Sequence[float | None]] | None = None,
    secondary_ylabel: str = "",
    shade: Sequence[tuple[float, float, str]] = (),
) -> Path:
    """Lines over ``x``; ``secondary`` series go on a right-hand axis; ``shade`` = (x0, x1, label) spans."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for x0, x1, label in shade:
        ax.axvspan(x0, x1, alpha=0.12, color="grey")
        ax.annotate(
            label, ((x0 + x1) / 2, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=7
        )
    for name, values in series.items():
        ax.plot(x, [np.nan if v is None else v for v in values], marker="o", markersize=3, label=name)
    if secondary:
        ax2 = ax.twinx()
        for name, values in secondary.items():
            ax2.plot(
                x, [np.nan if v is None else v for v in values], linestyle="--", marker="x", markersize=3, label=name
            )
        ax2.set_ylabel(secondary_ylabel)
        handles, labels = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(handles + h2, labels + l2, fontsize=8)
    else:
        ax.legend(fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    if log_x:
        ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
