"""Serving efficiency against the physical limit: the bare timm forward vs our model, engine, HTTP path
and ONNX Runtime engine, at several batch sizes, in one run.

    python benchmarks/perf.py --out runs/perf [--backbones offline,vit_small_patch16_224]
        [--batches 1,8,32] [--seconds 5] [--device cpu|cuda] [--dtype float32|bfloat16]

For each backbone (``offline`` = the shipped glyph ViT, ``ModelConfig()``; ``tiny`` = the tests' ViT;
any timm name, with seeded random weights unless ``--weights pretrained``) it builds a registry home
with ``--tasks`` published versions (learned quickly: random factors, the real code paths), then
measures images/s and latency at each batch size for:

* ``bare``: ``timm.create_model`` (same architecture, dtype, device, head size) in a loop under
  ``torch.inference_mode`` on a ready float tensor — the physical limit;
* ``model``: FMLoRAModel with the live snapshot loaded and merged, ``forward_detailed(x, 'auto')``
  on the same float tensor (adapter + meta-prompt routing; no engine);
* ``engine``: ``server.core.engine.Engine.predict_sync`` on uint8 arrays at the model's input size, one
  request of ``batch`` images at a time (resize/crop, normalisation, micro-batcher hand-off, forward,
  softmax, top-k, prompt info; ``max_wait_ms=0`` so a request never waits for company);
* ``engine_async``: the same engine under ``concurrency`` asyncio callers of ``Engine.predict`` (as the
  server's handlers call it; resizing in the engine's pool overlaps the previous forward);
* ``http``: a real server subprocess (``fmlora serve``), ``concurrency`` asyncio httpx clients posting
  JSON requests of ``batch`` pre-encoded images to POST /predict back to back;
* ``onnx``: the engine with ``backend='onnx'`` when server/onnx_engine.py and onnxruntime exist.

Writes ``perf.json`` (figures, ratios to ``bare`` per batch size, the targets: engine ≥ 0.95 × bare,
HTTP ≥ 0.85 × bare at batch 32) and ``perf-<backbone>.png``. It measures; it never asserts speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    REPO,
    BenchHome,
    ServerProcess,
    encode_image,
    http_load,
    limit_threads,
    make_home,
    plot_bars,
    predict_body,
    process_cpu_seconds,
    random_images,
    ratio,
    scrape_metrics,
    summarize,
    write_json,
)

PATHS = ("bare", "model", "engine", "engine_async", "http", "onnx")
ENGINE_TARGET = 0.95
HTTP_TARGET = 0.85
HTTP_TARGET_BATCH = 32


# -- timing ----------------------------------------------------------------------------------------
def timed_loop(
    step: Callable[[], Any],
    images_per_step: int,
    seconds: float,
    *,
    warmup: int = 2,
    min_iters: int = 1,
) -> dict[str, Any]:
    """Run ``step`` ``warmup`` times, then for ``seconds`` (at least ``min_iters`` times).

    Returns additive figures (images, wall_s, cpu_s) and the raw latencies (``_latencies``)."""
    for _ in range(warmup):
        step()
    latencies: list[float] = []
    started = time.perf_counter()
    cpu0 = time.process_time()
    while True:
        t0 = time.perf_counter()
        step()
        latencies.append(time.perf_counter() - t0)
        if len(latencies) >= min_iters and time.perf_counter() - started >= seconds:
            break
    return {
        "images": len(latencies) * images_per_step,
        "iterations": len(latencies),
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu0,
        "_latencies": latencies,
    }


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the paths: each a runner with measure(batch, seconds, first) and close() -----------------------
class BareRunner:
    """The bare timm forward (same architecture, head size, dtype, device) on a ready float tensor."""

    def __init__(self, config: Any, num_classes: int, batches: Sequence[int], device: Any, dtype: Any) -> None:
        import timm
        import torch

        bb = config.backbone
        torch.manual_seed(0)
        self.model = timm.create_model(bb.name, pretrained=False, num_classes=num_classes, **bb.model_kwargs)
        self.model = self.model.eval().to(device=device, dtype=dtype)
        size = tuple(self.model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:])
        if "img_size" in bb.model_kwargs:
            s = bb.model_kwargs["img_size"]
            size = (s, s) if isinstance(s, int) else tuple(s)
        gen = torch.Generator().manual_seed(0)
        self.inputs = {b: torch.randn((b, 3, *size), generator=gen).to(device=device, dtype=dtype) for b in batches}
        self.device = device

    def measure(self, batch: int, seconds: float, first: bool) -> dict[str, Any]:
        import torch

        x, model, device = self.inputs[batch], self.model, self.device

        def step() -> None:
            with torch.inference_mode():
                model(x)
            _sync(device)

        return timed_loop(step, batch, seconds, warmup=2 if first else 0)

    def close(self) -> None:
        del self.model, self.inputs


class ModelRunner:
    """FMLoRAModel with the live snapshot, merged, ``forward_detailed(x, 'auto')`` on a float tensor."""

    def __init__(self, bench: BenchHome, batches: Sequence[int], device: Any, dtype: Any) -> None:
        import torch

        from fmlora.model import FMLoRAModel
        from fmlora.model.snapshot import load_snapshot

        model = FMLoRAModel(bench.config)
        load_snapshot(model, bench.registry.snapshot_dir(bench.registry.live_version()))
        self.model = model.eval().to(device=device, dtype=dtype)
        self.model.merge()
        size = tuple(model.preprocessor.input_size)
        gen = torch.Generator().manual_seed(0)
        self.inputs = {
            b: model.preprocessor(torch.randint(0, 256, (b, 3, *size), dtype=torch.uint8, generator=gen)).to(device)
            for b in batches
        }
        self.device = device

    def measure(self, batch: int, seconds: float, first: bool) -> dict[str, Any]:
        import torch

        x, model, device = self.inputs[batch], self.model, self.device

        def step() -> None:
            with torch.inference_mode():
                model.forward_detailed(x, "auto")
            _sync(device)

        return timed_loop(step, batch, seconds, warmup=2 if first else 0)

    def close(self) -> None:
        del self.model, self.inputs


class EngineRunner:
    """``Engine.predict_sync`` with one request of ``batch`` uint8 images (model input size) at a time;
    ``max_wait_ms=0``, so a request never waits for company."""

    def __init__(self, bench: BenchHome, batches: Sequence[int], device: str, dtype: str, backend: str) -> None:
        from server.core.engine import Engine, EngineConfig

        cfg = EngineConfig(
            device=device,
            dtype=dtype,  # type: ignore[arg-type]
            backend=backend,  # type: ignore[arg-type]
            max_batch_size=max(batches),
            max_wait_ms=0.0,
            max_queue=max(256, 2 * max(batches)),
            request_timeout_s=600.0,
            watch=False,
            warmup_batch_sizes=tuple(sorted(set(batches))),
        )
        self.engine = Engine(bench.registry, cfg)
        t0 = time.perf_counter()
        self.engine.start()
        if self.engine.serving_version is None:
            self.engine.stop()
            raise RuntimeError("the engine serves no version")
        size = self.engine.input_size
        assert size is not None
        self.info = {"start_s": round(time.perf_counter() - t0, 3), "describe": self.engine.describe()}
        self.images = {b: random_images(b, size, seed=b) for b in batches}

    def measure(self, batch: int, seconds: float, first: bool) -> dict[str, Any]:
        engine, images = self.engine, self.images[batch]

        def step() -> None:
            pred = engine.predict_sync(images, top_k=5, prompt="auto")
            if len(pred.results) != batch:
                raise RuntimeError(f"{len(pred.results)} results for {batch} images")

        before = engine.stats()
        result = timed_loop(step, batch, seconds, warmup=2 if first else 0)
        after = engine.stats()
        result["engine_batches"] = after.get("batches_total", 0) - before.get("batches_total", 0)
        result["engine_items"] = after.get("items_total", 0) - before.get("items_total", 0)
        return result

    def measure_async(self, batch: int, seconds: float, first: bool, concurrency: int) -> dict[str, Any]:
        """``concurrency`` asyncio callers of ``Engine.predict`` (as the server's request handlers call
        it): resizing in the engine's thread pool overlaps the forward of the batch before."""
        engine, images = self.engine, self.images[batch]

        async def go(duration: float, min_calls: int) -> list[float]:
            latencies: list[float] = []
            deadline = time.perf_counter() + duration

            async def caller() -> None:
                calls = 0
                while time.perf_counter() < deadline or calls < min_calls:
                    t0 = time.perf_counter()
                    pred = await engine.predict(images, top_k=5, prompt="auto")
                    latencies.append(time.perf_counter() - t0)
                    calls += 1
                    if len(pred.results) != batch:
                        raise RuntimeError(f"{len(pred.results)} results for {batch} images")

            await asyncio.gather(*(caller() for _ in range(concurrency)))
            return latencies

        if first:
            asyncio.run(go(0.0, 1))
        before = engine.stats()
        started, cpu0 = time.perf_counter(), time.process_time()
        latencies = asyncio.run(go(seconds, 1))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
        after = engine.stats()
        return {
            "images": len(latencies) * batch,
            "iterations": len(latencies),
            "wall_s": wall,
            "cpu_s": cpu,
            "concurrency": concurrency,
            "engine_batches": after.get("batches_total", 0) - before.get("batches_total", 0),
            "engine_items": after.get("items_total", 0) - before.get("items_total", 0),
            "_latencies": latencies,
        }

    def close(self) -> None:
        self.engine.stop(10.0)


class EngineAsyncView:
    """The ``engine_async`` path: the ``engine`` runner's engine under concurrent async callers."""

    def __init__(self, runner: EngineRunner, max_batch: int, concurrency: str) -> None:
        self.runner, self.max_batch, self.concurrency = runner, max_batch, concurrency
        self.info = {"shares_engine_with": "engine"}

    def measure(self, batch: int, seconds: float, first: bool) -> dict[str, Any]:
        c = http_concurrency(batch, self.max_batch, self.concurrency)
        return self.runner.measure_async(batch, seconds, first, c)

    def close(self) -> None:
        pass  # the engine runner stops the engine


def http_concurrency(batch: int, max_batch: int, setting: str) -> int:
    """Clients for requests of ``batch`` images: ``auto`` keeps about two full model batches in flight."""
    if setting != "auto":
        return max(1, int(setting))
    return max(2, math.ceil(max_batch / batch))


class HttpRunner:
    """A real server subprocess (``fmlora serve``); ``concurrency`` asyncio httpx clients in this process
    post JSON requests of ``batch`` pre-encoded images to POST /predict back to back."""

    def __init__(
        self,
        bench: BenchHome,
        batches: Sequence[int],
        device: str,
        dtype: str,
        *,
        concurrency: str = "auto",
        image_format: str = "jpeg",
        threads: int | None = None,
        log_path: Path | None = None,
        launcher: str = "auto",
    ) -> None:
        self.max_batch = max(batches)
        self.settings = {
            "device": device,
            "dtype": dtype,
            "max_batch_size": self.max_batch,
            "max_images_per_request": self.max_batch,
            "max_queue": max(256, 4 * self.max_batch),
            "request_timeout_s": 600,
        }
        self.concurrency_setting = concurrency
        size = tuple(bench.model.preprocessor.input_size)
        self.bodies = {
            b: [
                predict_body([encode_image(im, image_format) for im in random_images(b, size, seed=100 * b + k)])
                for k in range(4)
            ]
            for b in batches
        }
        # Launched now, waited for in ready(): the server starts while the other paths set up.
        self.server = ServerProcess(
            bench.home, settings=self.settings, threads=threads, log_path=log_path, launcher=launcher
        ).start(wait=False)
        self.info: dict[str, Any] = {"launcher": self.server.used_launcher, "settings": self.settings}

    def ready(self) -> None:
        self.server.wait_ready()
        self.info["start_s"] = round(self.server.started_in_s or 0.0, 3)
        with contextlib.suppress(Exception):
            self.info["server_info"] = self.server.get_json("/info")

    def measure(self, batch: int, seconds: float, first: bool) -> dict[str, Any]:
        server, bodies = self.server, self.bodies[batch]
        c = http_concurrency(batch, self.max_batch, self.concurrency_setting)
        if first:  # every client once: connections open, server paths warm
            http_load(
                server.url, bodies, concurrency=c, seconds=0.0, images_per_request=batch, min_requests_per_client=1
            )
        m0, cpu0 = scrape_metrics(server.url), process_cpu_seconds(server.pid)
        load = http_load(
            server.url, bodies, concurrency=c, seconds=seconds, images_per_request=batch, min_requests_per_client=1
        )
        m1, cpu1 = scrape_metrics(server.url), process_cpu_seconds(server.pid)
        if not server.alive():
            raise RuntimeError(f"the server died during the run:\n{server.log_tail()}")

        def delta(name: str) -> float:
            return m1.get(name, 0.0) - m0.get(name, 0.0)

        return {
            "images": load.ok * batch,
            "iterations": load.requests,
            "wall_s": load.wall_s,
            "cpu_s": load.client_cpu_s,
            "concurrency": c,
            "statuses": {str(k): v for k, v in load.statuses.items()},
            "request_bytes": round(sum(len(x) for x in bodies) / len(bodies)),
            "server_batches": delta("fmlora_batch_size_count"),
            "server_items": delta("fmlora_batch_size_sum"),
            "server_model_s": delta("fmlora_batch_duration_seconds_sum"),
            "server_cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
            "_latencies": load.latencies_s,
        }

    def close(self) -> None:
        self.server.stop()


def onnx_unavailable(device: str) -> str | None:
    """Why the ONNX path cannot run here (None when it can)."""
    if not (REPO / "server" / "onnx_engine.py").is_file():
        return "server/onnx_engine.py does not exist (no ONNX backend in this checkout)"
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    if device.startswith("cuda"):
        return "the ONNX backend runs on CPU only"
    return None


# -- aggregation -----------------------------------------------------------------------------------
_ADDITIVE = ("images", "iterations", "wall_s", "cpu_s", "engine_batches", "engine_items")
_HTTP_ADDITIVE = ("server_batches", "server_items", "server_model_s", "server_cpu_s")


def aggregate(rounds: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """Pool the rounds of one path at one batch size: images/s over all rounds, latency over all
    requests, and each round's images/s (the spread shows how noisy the machine was)."""
    out: dict[str, Any] = {"batch": batch}
    for key in (*_ADDITIVE, *_HTTP_ADDITIVE):
        values = [r[key] for r in rounds if r.get(key) is not None]
        if values:
            out[key] = round(sum(values), 4)
    latencies = [x for r in rounds for x in r["_latencies"]]
    out["images_per_s"] = round(out["images"] / out["wall_s"], 3) if out.get("wall_s") else 0.0
    out["latency"] = summarize(latencies)
    out["rounds_images_per_s"] = [round(r["images"] / r["wall_s"], 3) if r["wall_s"] else 0.0 for r in rounds]
    if out.get("engine_batches"):
        out["mean_batch_size"] = round(out["engine_items"] / out["engine_batches"], 3)
    if "concurrency" in rounds[0]:
        out["concurrency"] = rounds[0]["concurrency"]
    if "statuses" in rounds[0]:
        out["request_bytes"] = rounds[0]["request_bytes"]
        statuses: dict[str, int] = {}
        for r in rounds:
            for k, v in r["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
        out["statuses"] = statuses
        out["failed_requests"] = sum(v for k, v in statuses.items() if k != "200")
        if out.get("server_batches"):
            out["server_mean_batch_size"] = round(out["server_items"] / out["server_batches"], 3)
        if out.get("wall_s") and out.get("server_model_s") is not None:
            out["server_model_busy_fraction"] = round(out["server_model_s"] / out["wall_s"], 3)
        if out.get("images") and out.get("server_cpu_s") is not None:
            out["server_cpu_ms_per_image"] = round(1000 * out["server_cpu_s"] / out["images"], 3)
        if out.get("images") and out.get("cpu_s") is not None:
            out["client_cpu_ms_per_image"] = round(1000 * out["cpu_s"] / out["images"], 3)
    return out


def _ratios(section: dict[str, Any], bare: dict[str, Any], batches: Sequence[int]) -> dict[str, Any]:
    """Pooled ratio (all rounds) and the median of same-round ratios, per batch size."""
    pooled: dict[str, float | None] = {}
    median: dict[str, float | None] = {}
    for b in batches:
        mine, limit = section.get(str(b)), bare.get(str(b))
        if not isinstance(mine, dict) or not isinstance(limit, dict):
            pooled[str(b)] = median[str(b)] = None
            continue
        pooled[str(b)] = ratio(mine.get("images_per_s"), limit.get("images_per_s"))
        per_round = [
            ratio(a, z) for a, z in zip(mine["rounds_images_per_s"], limit["rounds_images_per_s"], strict=False)
        ]
        values = sorted(v for v in per_round if v is not None)
        median[str(b)] = round(statistics.median(values), 3) if values else None
    return {"pooled": pooled, "median_of_rounds": median}


def _targets(ratios: dict[str, Any], batches: Sequence[int]) -> dict[str, Any]:
    at = str(HTTP_TARGET_BATCH if HTTP_TARGET_BATCH in batches else max(batches))
    http = ratios.get("http", {}).get("median_of_rounds", {}).get(at)
    out: dict[str, Any] = {"basis": "median over rounds of the same-round ratio to bare"}
    for path in ("engine", "engine_async"):
        engine = ratios.get(path, {}).get("median_of_rounds", {})
        engine_vals = [v for v in engine.values() if v is not None]
        out[f"{path}_ge_0.95_of_bare"] = {
            "target": ENGINE_TARGET,
            "per_batch": {b: (None if v is None else v >= ENGINE_TARGET) for b, v in engine.items()},
            "met": bool(engine_vals) and all(v >= ENGINE_TARGET for v in engine_vals),
        }
    return {
        **out,
        "http_ge_0.85_of_bare": {
            "target": HTTP_TARGET,
            "batch": int(at),
            "ratio": http,
            "met": None if http is None else http >= HTTP_TARGET,
        },
    }


def _setup_runners(
    name: str,
    args: argparse.Namespace,
    bench: BenchHome,
    labels: int,
    device: Any,
    dtype: Any,
    work: Path,
    runners: dict[str, Any],
    result: dict[str, Any],
) -> None:
    """Build the runner of every wanted path into ``runners`` (the caller closes them, also on failure)."""
    batches = args.batches
    dtype_name = str(dtype).replace("torch.", "")
    order = sorted(PATHS, key=lambda p: p != "http")  # the server starts while the rest sets up
    for path in order:
        if path not in args.paths:
            result[path] = {"status": "skipped"}
            continue
        if path == "onnx":
            reason = onnx_unavailable(str(device))
            if reason is not None:
                result[path] = {"status": "unavailable", "reason": reason}
                print(f"[perf] {name}: onnx unavailable: {reason}", flush=True)
                continue
        print(f"[perf] {name}: setting up {path} ...", flush=True)
        try:
            if path == "bare":
                runners[path] = BareRunner(bench.config, labels, batches, device, dtype)
            elif path == "model":
                runners[path] = ModelRunner(bench, batches, device, dtype)
            elif path == "engine":
                runners[path] = EngineRunner(bench, batches, str(device), dtype_name, "torch")
            elif path == "engine_async":
                engine = runners.get("engine")
                if engine is None:
                    raise RuntimeError("engine_async needs the engine path")
                runners[path] = EngineAsyncView(engine, max(batches), args.http_concurrency)
            elif path == "onnx":
                runners[path] = EngineRunner(bench, batches, "cpu", "float32", "onnx")
            else:
                runners[path] = HttpRunner(
                    bench,
                    batches,
                    str(device),
                    dtype_name,
                    concurrency=args.http_concurrency,
                    image_format=args.image_format,
                    threads=args.threads,
                    log_path=work / f"server-{name}.log",
                    launcher=args.launcher,
                )
        except Exception as exc:
            if args.strict:
                raise
            traceback.print_exc()
            result[path] = {"status": "failed", "reason": f"setup: {type(exc).__name__}: {exc}"}
    if "http" in runners:
        try:
            runners["http"].ready()
        except Exception as exc:
            if args.strict:
                raise
            traceback.print_exc()
            runners.pop("http").close()
            result["http"] = {"status": "failed", "reason": f"setup: {type(exc).__name__}: {exc}"}


def run_backbone(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build every runner of ``args.paths``, then measure in ``args.rounds`` interleaved rounds
    (each round: every batch size, every path, ``seconds / rounds`` each), so that load from other
    processes hits all paths alike."""
    import torch

    from server.core.engine import resolve_device, resolve_dtype

    batches = args.batches
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    dtype_name = str(dtype).replace("torch.", "")
    t0 = time.perf_counter()
    bench = make_home(
        work / f"home-{name}", name, tasks=args.tasks, classes_per_task=args.classes_per_task, weights=args.weights
    )
    labels = len(bench.model.labels)
    result: dict[str, Any] = {
        "backbone": bench.config.backbone.model_dump(mode="json"),
        "input_size": list(bench.model.preprocessor.input_size),
        "backbone_parameters": sum(p.numel() for p in bench.model.backbone.parameters()),
        "adapter_parameters": bench.model.adapter_parameter_count(),
        "tasks": [t.name for t in bench.model.tasks],
        "labels": labels,
        "live_version": bench.registry.live_version(),
        "device": str(device),
        "dtype": dtype_name,
        "rounds": args.rounds,
        "home_setup_s": round(time.perf_counter() - t0, 3),
    }
    runners: dict[str, Any] = {}
    rounds: dict[str, dict[int, list[dict[str, Any]]]] = {}
    failed: dict[str, str] = {}
    per_round = args.seconds / args.rounds
    try:
        _setup_runners(name, args, bench, labels, device, dtype, work, runners, result)
        order = {p: runners[p] for p in PATHS if p in runners}
        runners.clear()
        runners.update(order)
        rounds = {p: {b: [] for b in batches} for p in runners}
        for r in range(args.rounds):
            for b in batches:
                for path, runner in runners.items():
                    if path in failed:
                        continue
                    try:
                        rounds[path][b].append(runner.measure(b, per_round, first=(r == 0)))
                    except Exception as exc:
                        if args.strict:
                            raise
                        traceback.print_exc()
                        failed[path] = f"{type(exc).__name__}: {exc}"
            print(f"[perf] {name}: round {r + 1}/{args.rounds} done", flush=True)
    finally:
        for runner in runners.values():
            try:
                runner.close()
            except Exception:
                traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for path, runner in runners.items():
        if path in failed:
            result[path] = {"status": "failed", "reason": failed[path]}
            continue
        section: dict[str, Any] = {"status": "ok"}
        if getattr(runner, "info", None):
            section["_info"] = runner.info
        for b in batches:
            section[str(b)] = aggregate(rounds[path][b], b)
        result[path] = section
        _print_section(name, path, section, batches)
    bare = result.get("bare", {})
    ratios = {p: _ratios(result[p], bare, batches) for p in PATHS if p != "bare" and result[p].get("status") == "ok"}
    result["ratios_to_bare"] = ratios
    result["targets"] = _targets(ratios, batches)
    return result


def _print_section(name: str, path: str, section: dict[str, Any], batches: Sequence[int]) -> None:
    for b in batches:
        r = section.get(str(b))
        if isinstance(r, dict):
            lat = r.get("latency", {})
            extra = f" c={r['concurrency']}" if "concurrency" in r else ""
            print(
                f"[perf] {name:>24s} {path:>6s} b={b:<3d}{extra} {r['images_per_s']:10.1f} img/s"
                f"  p50 {lat.get('p50_ms')} ms  p99 {lat.get('p99_ms')} ms",
                flush=True,
            )


def plot(results: dict[str, Any], out: Path, batches: Sequence[int]) -> list[Path]:
    files = []
    for name, res in results["backbones"].items():
        series: dict[str, list[float | None]] = {}
        notes: dict[str, list[str | None]] = {}
        for path in PATHS:
            sec = res.get(path, {})
            if sec.get("status") != "ok":
                continue
            series[path] = [sec.get(str(b), {}).get("images_per_s") for b in batches]
            if path != "bare":
                notes[path] = [
                    None if r is None else f"{r:.2f}"
                    for r in (res["ratios_to_bare"][path].get(str(b)) for b in batches)
                ]
        if not series:
            continue
        files.append(
            plot_bars(
                out / f"perf-{name.replace('/', '_')}.png",
                [f"batch {b}" for b in batches],
                series,
                title=f"{name} ({res['device']}, {res['dtype']}): images/s, ratio to bare on bars",
                ylabel="images / s",
                annotate=notes,
            )
        )
    return files


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    limit_threads(args.threads)
    results: dict[str, Any] = {
        "benchmark": "perf",
        "settings": {
            "backbones": args.backbones,
            "batches": args.batches,
            "seconds": args.seconds,
            "device": args.device,
            "dtype": args.dtype,
            "tasks": args.tasks,
            "weights": args.weights,
            "paths": args.paths,
            "rounds": args.rounds,
            "http_concurrency": args.http_concurrency,
            "image_format": args.image_format,
            "threads": args.threads,
        },
        "notes": [
            "bare: timm forward on a ready float tensor (no preprocessing, no top-k): the physical limit.",
            "engine: Engine.predict_sync, one request of `batch` uint8 images at the model's input size at a "
            "time, max_wait_ms=0 (includes resize/centre-crop, normalisation, batcher hand-off, top-k).",
            "http: server subprocess + asyncio httpx clients in this process, on the same machine: the "
            "client's CPU time (client_cpu_s) competes with the server's.",
            "Paths are measured in interleaved rounds; ratios_to_bare.median_of_rounds (the basis of the "
            "targets) compares paths measured minutes apart at most, pooled compares totals.",
        ],
        "backbones": {},
    }
    with tempfile.TemporaryDirectory(prefix="fmlora-perf-") as tmp:
        work = Path(tmp)
        for name in args.backbones:
            results["backbones"][name] = run_backbone(name, args, work)
            write_json(out / "perf.json", results)  # partial results survive a later failure
            for log in work.glob("server-*.log"):
                with contextlib.suppress(OSError):
                    (out / log.name).write_bytes(log.read_bytes())
    results["plots"] = [str(p.name) for p in plot(results, out, args.batches)]
    write_json(out / "perf.json", results)
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for perf.json and the plots")
    parser.add_argument("--backbones", default="offline,vit_small_patch16_224", help="comma-separated")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--seconds", type=float, default=6.0, help="measuring time per path and batch size")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds the seconds are split into")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--paths", default=",".join(PATHS), help=f"subset of {','.join(PATHS)}")
    parser.add_argument("--tasks", type=int, default=2, help="published tasks in the snapshot (>= 2)")
    parser.add_argument("--classes-per-task", type=int, default=5)
    parser.add_argument("--weights", default="random", choices=["random", "pretrained"])
    parser.add_argument(
        "--http-concurrency",
        default="auto",
        help="clients per batch size for http and engine_async ('auto': ceil(max batch / batch), at least 2)",
    )
    parser.add_argument("--image-format", default="jpeg", choices=["jpeg", "png"])
    parser.add_argument("--threads", type=int, default=None, help="torch/OMP threads here and in the server")
    parser.add_argument("--launcher", default="auto", choices=["auto", "cli", "uvicorn"])
    parser.add_argument("--strict", action="store_true", help="stop at the first failing path")
    args = parser.parse_args(argv)
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    args.batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths: {', '.join(sorted(unknown))}")
    if "bare" not in args.paths:
        args.paths.insert(0, "bare")  # ratios need the limit
    if "engine_async" in args.paths and "engine" not in args.paths:
        args.paths.append("engine")  # engine_async shares its engine
    args.paths = [p for p in PATHS if p in args.paths]
    if args.rounds < 1 or args.seconds < 0:
        parser.error("--rounds must be >= 1 and --seconds >= 0")
    if not args.batches or min(args.batches) < 1:
        parser.error("batch sizes must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    results = run(args)
    print(f"[perf] wrote {Path(args.out) / 'perf.json'}")
    for name, res in results["backbones"].items():
        print(f"[perf] {name}: ratios to bare {res['ratios_to_bare']}")
        print(f"[perf] {name}: targets {res['targets']}")


if __name__ == "__main__":
    main()
