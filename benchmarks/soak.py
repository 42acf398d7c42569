"""Memory soak: many swaps under light load, the server's memory sampled throughout, and a negative
control that leaks on purpose and must be caught by the same detector.

Three runs, each on a fresh registry home, each swapping ``--swaps`` times (a re-published version of
the same tasks, so every snapshot has the same size; a rollback every ``--rollback-every`` swaps; old
versions pruned every 50 swaps as a worker with ``keep_versions`` would):

- ``server``: a real server (``fmlora serve --no-worker`` child process) with two light clients;
  the resident set size of the server process (and its GPU memory on a GPU, from nvidia-smi) is
  sampled after every swap;
- ``harness``: the real engine (``server.core.engine.Engine``) in a child process of its own, swapped
  with ``engine.reload()`` after each publish, a light prediction thread; its own RSS (and
  ``torch.cuda.memory_allocated`` on a GPU) sampled after every swap;
- ``leaky``: the same harness with the engine's version cache replaced by ``LeakyVersionCache``, a
  subclass that keeps every loaded snapshot's tensors in a list: a leak of one snapshot per swap.
  It exists only here; the product has no test hook.

The detector (``detect_leak``) skips a warm-up (caches filling, allocator arenas), then compares the
median of the last tenth of the samples with the median of the first tenth; growth above
``--limit-mb`` (default 50, the target) is a leak. The real runs must stay under it; the leaky control
must be flagged, or the soak proves nothing (the control leaks one snapshot's tensors per loaded
version, ~280 KB for the offline glyph ViT, so ``--swaps`` must make swaps x snapshot size well above the
limit: 1,000 swaps leak ~270 MB).

    python -m benchmarks.soak --out runs/soak [--swaps 1000]

Writes ``soak.json`` and ``soak.png`` (memory over swaps, three series) in ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.plots import pyplot, save
from benchmarks.processes import gpu_memory_bytes, limit_threads, rss_bytes, scrape_metrics
from benchmarks.publish import make_home
from benchmarks.report import write_json

__all__ = ["SoakConfig", "detect_leak", "leaking_version_cache", "run_harness", "run_server_soak", "run_soak"]

MB = 2**20


# -- the detector ------------------------------------------------------------------------------------
def detect_leak(samples: Sequence[tuple[int, int]], limit_bytes: float, warmup: int) -> dict[str, Any]:
    """``samples``: (swap index, bytes). A leak is growth over ``limit_bytes`` between the start and
    the end of the run after ``warmup`` swaps (medians of the first and last tenth of the samples)."""
    points = [(i, b) for i, b in samples if b is not None]
    if not points:
        return {"samples": 0, "leak": None}
    post = [(i, b) for i, b in points if i >= warmup] or points
    w = max(1, len(post) // 10)
    start = statistics.median(b for _, b in post[:w])
    end = statistics.median(b for _, b in post[-w:])
    growth = end - start
    xs = [float(i) for i, _ in post]
    ys = [float(b) for _, b in post]
    slope = 0.0
    if len(post) > 1 and max(xs) > min(xs):
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return {
        "samples": len(points),
        "warmup_swaps": warmup,
        "first_bytes": points[0][1],
        "last_bytes": points[-1][1],
        "max_bytes": max(b for _, b in points),
        "start_bytes": int(start),
        "end_bytes": int(end),
        "growth_mb": round(growth / MB, 3),
        "slope_kb_per_swap": round(slope / 1024, 3),
        "limit_mb": round(limit_bytes / MB, 3),
        "leak": bool(growth > limit_bytes),
    }


# -- the negative control ----------------------------------------------------------------------------
def _leaky_cache_class() -> type:
    from server.core.versions import VersionCache

    class LeakyVersionCache(VersionCache):
        """The real cache, except that it keeps every loaded snapshot's tensors forever."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.leaked: list[dict[str, Any]] = []

        def _load_now(self, version: int, sha256: str, info: Any) -> Any:
            entry = super()._load_now(version, sha256, info)
            self.leaked.append(dict(entry.tensors))
            return entry

    return LeakyVersionCache


@contextmanager
def leaking_version_cache() -> Iterator[type]:
    """While active, engines started in this process build a ``LeakyVersionCache``."""
    import server.core.engine as engine_module

    original = engine_module.VersionCache
    leaky = _leaky_cache_class()
    engine_module.VersionCache = leaky
    try:
        yield leaky
    finally:
        engine_module.VersionCache = original


# -- configuration -----------------------------------------------------------------------------------
@dataclass
class SoakConfig:
    out: Path
    swaps: int = 1000
    control_swaps: int | None = None  # swaps of the two harness runs (default: swaps)
    backbone: str = "offline"
    device: str = "cpu"
    dtype: str = "auto"
    threads: int | None = 1
    limit_mb: float = 50.0
    warmup: int | None = None  # default: max(10, swaps // 20)
    rollback_every: int = 25
    prune_every: int = 50
    keep_versions: int = 16
    cached_versions: int = 4
    load_clients: int = 2
    think_ms: float = 20.0
    poll_interval_s: float = 0.02
    swap_timeout_s: float = 60.0
    gpu_every: int = 10
    runs: tuple[str, ...] = ("server", "harness", "leaky")
    parallel_harness: bool = True  # run the harness and the leaky control side by side (after the server)
    seed: int = 0
    plot: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def warmup_for(self, swaps: int) -> int:
        return self.warmup if self.warmup is not None else max(10, swaps // 20)


def _swap_plan(i: int, cfg: SoakConfig, good: list[int], current: int | None) -> int | None:
    """The version to roll back to at swap ``i``, or None for a new publish."""
    if cfg.rollback_every and i % cfg.rollback_every == cfg.rollback_every - 1 and len(good) > 2:
        recent = [v for v in good[-6:] if v != current]
        return recent[i % len(recent)] if recent else None
    return None


# -- the in-process harness (run in a child process) -------------------------------------------------
def run_harness(params: dict[str, Any]) -> dict[str, Any]:
    """Swap the real engine ``swaps`` times in this process and sample this process's memory.

    ``params``: home, backbone, weights_dir, swaps, leaky, device, dtype, threads, cached_versions,
    rollback_every, prune_every, keep_versions, think_ms, seed."""
    limit_threads(params.get("threads"))
    import numpy as np
    import torch

    from server.core.engine import Engine, EngineConfig

    cfg = SoakConfig(
        out=Path(params["home"]),
        swaps=params["swaps"],
        rollback_every=params["rollback_every"],
        prune_every=params["prune_every"],
        keep_versions=params["keep_versions"],
    )
    publisher = make_home(
        params["home"],
        params["backbone"],
        tasks=2,
        classes_per_task=2,
        weights_dir=params["weights_dir"],
        seed=params["seed"],
    )
    registry = publisher.registry
    engine_cfg = EngineConfig(
        device=params["device"],
        dtype=params["dtype"],
        cached_versions=params["cached_versions"],
        watch=False,
        max_wait_ms=1.0,
    )
    leaky_ctx = leaking_version_cache() if params["leaky"] else nullcontext()
    with leaky_ctx:
        engine = Engine(registry, engine_cfg)
        engine.start()
    cuda = engine.device is not None and str(engine.device).startswith("cuda")
    size = tuple(publisher.model.preprocessor.input_size)
    image = np.random.default_rng(0).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}

    def light_load() -> None:
        while not stop.is_set():
            try:
                engine.predict_sync([image], top_k=3)
                counts["ok"] += 1
            except Exception:
                counts["failed"] += 1
            stop.wait(params["think_ms"] / 1000)

    thread = threading.Thread(target=light_load, name="soak-load", daemon=True)
    thread.start()
    pid = os.getpid()
    rss: list[tuple[int, int]] = [(0, rss_bytes(pid) or 0)]
    gpu: list[tuple[int, int]] = []
    if cuda:
        gpu.append((0, int(torch.cuda.memory_allocated())))
    refused = 0
    started = time.monotonic()
    try:
        for i in range(1, params["swaps"] + 1):
            target = _swap_plan(i, cfg, publisher.good_versions, engine.serving_version)
            if target is not None:
                publisher.rollback(target)
                version = target
            else:
                version = publisher.publish(new_task=False).version
            engine.reload()
            if engine.serving_version != version:
                refused += 1
            if cfg.prune_every and i % cfg.prune_every == 0:
                registry.prune(cfg.keep_versions)
            rss.append((i, rss_bytes(pid) or 0))
            if cuda:
                gpu.append((i, int(torch.cuda.memory_allocated())))
    finally:
        stop.set()
        thread.join(10)
        engine.stop(10)
    cache = getattr(engine, "_cache", None)
    return {
        "pid": pid,
        "seconds": round(time.monotonic() - started, 3),
        "swaps": params["swaps"],
        "not_served": refused,
        "requests": dict(counts),
        "rss": rss,
        "gpu": gpu,
        "leaked_snapshots": len(getattr(cache, "leaked", [])),
        "cache_class": type(cache).__name__,
        "engine_swaps_total": engine.swaps_total,
    }


# -- the real server ------------------------------------------------------------------------------------
def run_server_soak(cfg: SoakConfig, work: Path) -> dict[str, Any]:
    from benchmarks.processes import ServerProcess
    from benchmarks.swap import Control, LoadGenerator, predict_bodies

    publisher = make_home(work / "home", cfg.backbone, tasks=2, classes_per_task=2, seed=cfg.seed)
    registry = publisher.registry
    settings = {
        "poll_interval_s": cfg.poll_interval_s,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "cached_versions": cfg.cached_versions,
    }
    size = publisher.model.preprocessor.input_size
    rss: list[tuple[int, int]] = []
    gpu: list[tuple[int, int]] = []
    not_served = 0
    with ServerProcess(
        work / "home", settings=settings, threads=cfg.threads, log_path=cfg.out / "server.log"
    ) as server:
        control = Control(server.url, server.admin_key)
        on_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and _cuda_available())
        load = LoadGenerator(server.url, cfg.load_clients, predict_bodies(size), think_s=cfg.think_ms / 1000)
        load.start()
        started = time.monotonic()
        try:
            rss.append((0, rss_bytes(server.pid) or 0))
            if on_gpu:
                gpu.append((0, gpu_memory_bytes(server.pid) or 0))
            for i in range(1, cfg.swaps + 1):
                target = _swap_plan(i, cfg, publisher.good_versions, control.serving())
                item = publisher.rollback(target) if target is not None else publisher.publish(new_task=False)
                if control.wait_serving(item.version, cfg.swap_timeout_s, interval_s=0.005) is None:
                    not_served += 1
                if cfg.prune_every and i % cfg.prune_every == 0:
                    registry.prune(cfg.keep_versions)
                rss.append((i, rss_bytes(server.pid) or 0))
                if on_gpu and i % cfg.gpu_every == 0:
                    gpu.append((i, gpu_memory_bytes(server.pid) or 0))
            metrics = scrape_metrics(server.url)
        finally:
            requests = load.stop()
            control.close()
        alive = server.alive()
    failed = [r for r in requests if r.status != 200]
    return {
        "pid": None,
        "seconds": round(time.monotonic() - started, 3),
        "swaps": cfg.swaps,
        "not_served": not_served,
        "requests": {"ok": len(requests) - len(failed), "failed": len(failed)},
        "rss": rss,
        "gpu": gpu,
        "server_alive_at_end": alive,
        "server_swaps_total": metrics.get("fmlora_swaps_total"),
        "server_swaps_failed_total": metrics.get("fmlora_swaps_failed_total"),
    }


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


# -- all runs -------------------------------------------------------------------------------------------
def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.out = out
    limit = cfg.limit_mb * MB
    runs: dict[str, dict[str, Any]] = {}
    work_root = Path(tempfile.mkdtemp(prefix="fmlora-soak-"))
    try:
        harness_params: dict[str, dict[str, Any]] = {}
        for name in cfg.runs:
            work = work_root / name
            work.mkdir()
            if name == "server":
                runs[name] = run_server_soak(cfg, work)
                continue
            harness_params[name] = {
                "home": str(work / "home"),
                "weights_dir": str(work / "weights"),
                "backbone": cfg.backbone,
                "swaps": cfg.control_swaps or cfg.swaps,
                "leaky": name == "leaky",
                "device": cfg.device,
                "dtype": cfg.dtype,
                "threads": cfg.threads,
                "cached_versions": cfg.cached_versions,
                "rollback_every": cfg.rollback_every,
                "prune_every": cfg.prune_every,
                "keep_versions": cfg.keep_versions,
                "think_ms": cfg.think_ms,
                "seed": cfg.seed,
            }
        if harness_params:
            # Each harness is a process of its own (its RSS is the measurement); they may run side by side.
            workers = len(harness_params) if cfg.parallel_harness else 1
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futures = {name: pool.submit(run_harness, params) for name, params in harness_params.items()}
                for name, future in futures.items():
                    runs[name] = future.result()
        for name, run in runs.items():
            swaps = cfg.swaps if name == "server" else (cfg.control_swaps or cfg.swaps)
            warmup = cfg.warmup_for(swaps)
            run["rss_check"] = detect_leak(run["rss"], limit, warmup)
            run["gpu_check"] = detect_leak(run["gpu"], limit, warmup) if run["gpu"] else None
            run["leak_detected"] = bool(run["rss_check"]["leak"] or (run["gpu_check"] or {}).get("leak"))
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    verdict = {
        "real_runs_under_limit": all(not runs[n]["leak_detected"] for n in runs if n != "leaky"),
        "control_caught": runs["leaky"]["leak_detected"] if "leaky" in runs else None,
        "zero_failed_requests": all(r["requests"]["failed"] == 0 for r in runs.values()),
        "every_swap_served": all(r["not_served"] == 0 for r in runs.values()),
    }
    result = {
        "benchmark": "soak",
        "target": f"memory growth < {cfg.limit_mb:g} MB over {cfg.swaps} swaps; the leaking control is caught",
        "verdict": verdict,
        "summary": {
            name: {
                "swaps": r["swaps"],
                "seconds": r["seconds"],
                "rss_start_mb": round(r["rss"][0][1] / MB, 2) if r["rss"] else None,
                "rss_end_mb": round(r["rss"][-1][1] / MB, 2) if r["rss"] else None,
                "rss_growth_mb": r["rss_check"].get("growth_mb"),
                "rss_slope_kb_per_swap": r["rss_check"].get("slope_kb_per_swap"),
                "gpu_growth_mb": (r["gpu_check"] or {}).get("growth_mb"),
                "leak_detected": r["leak_detected"],
                "requests": r["requests"],
            }
            for name, r in runs.items()
        },
        "runs": runs,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
    }
    write_json(out / "soak.json", result)
    if cfg.plot:
        plot_memory(out / "soak.png", runs, cfg.limit_mb, cfg.warmup_for(cfg.swaps))
    return result


def plot_memory(path: Path, runs: dict[str, dict[str, Any]], limit_mb: float, warmup: int = 0) -> Path:
    fig, ax = pyplot().subplots(figsize=(9, 4.5))
    if warmup:
        ax.axvspan(0, warmup, color="grey", alpha=0.12, label="warm-up (not measured)")
    for name, run in runs.items():
        if not run["rss"]:
            continue
        base = run["rss"][0][1]
        label = f"{name} RSS ({'leak' if run['leak_detected'] else 'ok'})"
        ax.plot([i for i, _ in run["rss"]], [(b - base) / MB for _, b in run["rss"]], label=label, linewidth=1)
        if run["gpu"]:
            gbase = run["gpu"][0][1]
            ax.plot(
                [i for i, _ in run["gpu"]],
                [(b - gbase) / MB for _, b in run["gpu"]],
                linestyle="--",
                label=f"{name} GPU memory",
            )
    ax.axhline(limit_mb, color="red", linestyle=":", label=f"limit {limit_mb:g} MB")
    ax.set_xlabel("swaps")
    ax.set_ylabel("memory growth since the first sample (MB)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--swaps", type=int, default=1000)
    p.add_argument("--control-swaps", type=int, default=None, help="swaps of the harness runs (default: --swaps)")
    p.add_argument("--backbone", default="offline", help="offline (shipped glyph ViT), tiny, or a timm ViT name")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (0: no limit)")
    p.add_argument("--limit-mb", type=float, default=50.0)
    p.add_argument("--warmup", type=int, default=None, help="swaps skipped before measuring growth")
    p.add_argument("--runs", default="server,harness,leaky", help="comma-separated: server, harness, leaky")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = SoakConfig(
        out=args.out,
        swaps=args.swaps,
        control_swaps=args.control_swaps,
        backbone=args.backbone,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads or None,
        limit_mb=args.limit_mb,
        warmup=args.warmup,
        runs=tuple(r.strip() for r in args.runs.split(",") if r.strip()),
        seed=args.seed,
    )
    result = run_soak(cfg)
    print(json.dumps({"verdict": result["verdict"], "summary": result["summary"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
