"""Statistics and result files: every result file says which machine, torch, commit and command made it."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import REPO

__all__ = ["command_line", "git_commit", "machine_info", "ratio", "summarize", "write_json"]


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

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
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


def command_line() -> str:
    """How this process was started, as one would type it again (``python -m benchmarks.perf ...``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    started = ["-m", spec.name] if spec is not None and spec.name else sys.argv[:1]
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *started, *sys.argv[1:]])


def write_json(path: str | Path, payload: Mapping[str, Any], *, machine: bool = True) -> Path:
    """Write ``payload`` (plus ``machine`` and ``command`` unless present) atomically as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(payload)
    if machine and "machine" not in data:
        data["machine"] = machine_info()
    data.setdefault("command", command_line())
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


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
