"""Serving efficiency against the physical limit: the bare timm forward vs our model, engine, HTTP path
and ONNX Runtime engine, at several batch sizes, in one run.

    python -m benchmarks.perf --out runs/perf [--backbones offline,vit_small_patch16_224]
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
* ``onnx``: the engine with ``backend='onnx'`` when server/core/backends/onnx.py and onnxruntime exist.

Writes ``perf.json`` (figures, ratios to ``bare`` per batch size, the targets: engine ≥ 0.95 × bare,
HTTP ≥ 0.85 × bare at batch 32) and ``perf-<backbone>.png``. It measures; it never asserts speed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.perf_paths import (
    BareRunner,
    EngineAsyncView,
    EngineRunner,
    HttpRunner,
    ModelRunner,
    onnx_unavailable,
)
from benchmarks.plots import plot_bars
from benchmarks.processes import limit_threads
from benchmarks.publish import Publisher, make_home
from benchmarks.report import ratio, summarize, write_json

PATHS = ("bare", "model", "engine", "engine_async", "http", "onnx")
ENGINE_TARGET = 0.95
HTTP_TARGET = 0.85
HTTP_TARGET_BATCH = 32


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
    bench: Publisher,
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
                runners[path] = BareRunner(bench.registry.model_config, labels, batches, device, dtype)
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
        "backbone": bench.registry.model_config.backbone.model_dump(mode="json"),
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
