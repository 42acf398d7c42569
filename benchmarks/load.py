"""Load and backpressure: ramp concurrent clients against a real server with a small queue, to
saturation and beyond, then stop the overload and check that the server recovers.

    python -m benchmarks.load --out runs/load [--seconds 8] [--max-concurrency 64]
        [--backbone offline] [--max-queue 16] [--images-per-request 1] [--device cpu]

Phases, against one ``fmlora serve`` subprocess (no worker; a home with two published versions):

1. ``ramp``: closed-loop asyncio httpx clients at concurrency 1, 2, 4, ... ``--max-concurrency``,
   ``--seconds`` each. A client that gets 429/503 waits ``--reject-pause-ms`` (as a polite client
   would; Retry-After is recorded, not obeyed, so the overload stays on) and sends again.
2. ``burst``: ``--burst`` requests fired at once (open loop): far more than the queue holds.
3. ``recovery``: the overload stops; one client for ``--recovery-seconds``: every request must
   succeed again, at about the latency of the first ramp step.

A background sampler reads GET /metrics (queue depth, in-flight requests) through the run.

Writes ``load.json`` (per step: throughput, latency percentiles of the 200s, counts of 200/429/503/504
and client timeouts, Retry-After coverage, queue depth; the plateau; checks: overload answered with
429/503 with Retry-After instead of timeouts, bounded latency, recovery) and ``load.png``,
``load-timeline.png``. It measures; the checks are reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.loadgen import LoadResult, encode_image, http_load, predict_body, random_images
from benchmarks.plots import plot_lines
from benchmarks.processes import ServerProcess, limit_threads, process_cpu_seconds, scrape_metrics
from benchmarks.publish import make_home
from benchmarks.report import write_json

REJECTIONS = (429, 503)
TIMEOUTS = (504,)


class MetricsSampler(threading.Thread):
    """Reads the server's queue depth and in-flight requests every ``interval_s`` seconds."""

    def __init__(self, url: str, t0: float, interval_s: float = 0.25) -> None:
        super().__init__(name="metrics-sampler", daemon=True)
        self.url, self.t0, self.interval_s = url, t0, interval_s
        self.samples: list[dict[str, float]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            m = scrape_metrics(self.url, timeout=2.0)
            if m:
                self.samples.append(
                    {
                        "t": round(time.perf_counter() - self.t0, 3),
                        "queue_depth": m.get("fmlora_queue_depth", float("nan")),
                        "in_flight": m.get("fmlora_http_requests_in_flight", float("nan")),
                    }
                )
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5.0)

    def window(self, start: float, end: float) -> dict[str, Any]:
        depth = [
            s["queue_depth"] for s in self.samples if start <= s["t"] <= end and s["queue_depth"] == s["queue_depth"]
        ]
        flight = [s["in_flight"] for s in self.samples if start <= s["t"] <= end and s["in_flight"] == s["in_flight"]]
        return {
            "samples": len(depth),
            "queue_depth_max": max(depth) if depth else None,
            "queue_depth_mean": round(statistics.fmean(depth), 2) if depth else None,
            "in_flight_max": max(flight) if flight else None,
        }


def _phase(
    name: str, result: LoadResult, start: float, end: float, sampler: MetricsSampler | None, server_cpu: float | None
) -> dict[str, Any]:
    d = result.to_dict()
    d.pop("client_cpu_s", None)
    statuses = result.statuses
    d.update(
        {
            "phase": name,
            "t_start": round(start, 3),
            "t_end": round(end, 3),
            "rejected": sum(statuses.get(s, 0) for s in REJECTIONS),
            "timeouts": sum(statuses.get(s, 0) for s in TIMEOUTS) + result.client_timeouts,
            "server_errors": sum(v for k, v in statuses.items() if k >= 500 and k not in (503, 504)),
            "other": sum(v for k, v in statuses.items() if k not in (200, 429, 503, 504, 0) and k < 500),
            "rejections_with_retry_after": sum(result.retry_after.get(s, 0) for s in REJECTIONS),
            "client_cpu_s": round(result.client_cpu_s, 3),
            "server_cpu_s": None if server_cpu is None else round(server_cpu, 3),
        }
    )
    if sampler is not None:
        d["server"] = sampler.window(start, end)
    return d


def concurrency_levels(max_concurrency: int) -> list[int]:
    levels, c = [], 1
    while c < max_concurrency:
        levels.append(c)
        c *= 2
    levels.append(max_concurrency)
    return levels


def analyse(
    ramp: list[dict[str, Any]], burst: dict[str, Any], recovery: dict[str, Any], settings: dict[str, Any]
) -> dict[str, Any]:
    """The plateau and the checks the issue asks for (reported, not asserted)."""
    best = max(ramp, key=lambda p: p["images_per_s"])
    plateau = best["images_per_s"]
    saturation = next((p["concurrency"] for p in ramp if p["images_per_s"] >= 0.9 * plateau), best["concurrency"])
    overloaded = [p for p in ramp if p["rejected"] > 0] + ([burst] if burst["requests"] else [])
    rejected = sum(p["rejected"] for p in overloaded)
    with_retry = sum(p["rejections_with_retry_after"] for p in overloaded)
    timeouts_all = sum(p["timeouts"] for p in [*ramp, burst, recovery])
    errors_all = sum(p["server_errors"] + p["other"] + p["connection_errors"] for p in [*ramp, burst, recovery])
    p99s = [p["latency"]["p99_ms"] for p in ramp if p["latency"]["p99_ms"] is not None]
    base_p50 = ramp[0]["latency"]["p50_ms"]
    rec_p50 = recovery["latency"]["p50_ms"]
    timeout_ms = 1000 * float(settings["request_timeout_s"])
    return {
        "plateau_images_per_s": plateau,
        "plateau_at_concurrency": best["concurrency"],
        "saturation_concurrency": saturation,
        "overload_seen": bool(overloaded),
        "rejected_total": rejected,
        "rejections_with_retry_after": with_retry,
        "timeouts_total": timeouts_all,
        "unexpected_errors_total": errors_all,
        "max_p99_ms": max(p99s) if p99s else None,
        "request_timeout_ms": timeout_ms,
        "recovery": {
            "requests": recovery["requests"],
            "ok": recovery["ok"],
            "p50_ms": rec_p50,
            "p50_ratio_to_first_step": None if not base_p50 or rec_p50 is None else round(rec_p50 / base_p50, 3),
        },
        "checks": {
            "overload_answered_with_429_or_503": bool(overloaded) and rejected > 0,
            "every_rejection_has_retry_after": rejected > 0 and with_retry == rejected,
            "no_timeouts": timeouts_all == 0,
            "no_unexpected_errors": errors_all == 0,
            "latency_bounded_below_timeout": bool(p99s) and max(p99s) < timeout_ms,
            "recovered": recovery["requests"] > 0 and recovery["ok"] == recovery["requests"],
        },
    }


def plot(result: dict[str, Any], out: Path) -> list[str]:
    ramp = result["ramp"]
    x = [p["concurrency"] for p in ramp]
    files = [
        plot_lines(
            out / "load.png",
            x,
            {
                "ok images/s": [p["images_per_s"] for p in ramp],
                "429+503 /s": [round(p["rejected"] / p["wall_s"], 2) if p["wall_s"] else None for p in ramp],
            },
            secondary={
                "p50 ms (200s)": [p["latency"]["p50_ms"] for p in ramp],
                "p99 ms (200s)": [p["latency"]["p99_ms"] for p in ramp],
            },
            secondary_ylabel="latency (ms)",
            title=f"load: {result['settings']['backbone']}, max_queue={result['settings']['max_queue']} images",
            xlabel="concurrent clients",
            ylabel="per second",
            log_x=True,
        ).name
    ]
    events = result.pop("_events", [])
    if events:
        end = max(t for t, _, _ in events)
        seconds = list(range(int(end) + 1))
        counts: dict[str, list[float]] = {
            "200": [0] * len(seconds),
            "429/503": [0] * len(seconds),
            "504/timeout": [0] * len(seconds),
        }
        for t, status, _ in events:
            key = (
                "200"
                if status == 200
                else "429/503"
                if status in REJECTIONS
                else "504/timeout"
                if status in (0, 504)
                else None
            )
            if key is not None and int(t) < len(seconds):
                counts[key][int(t)] += 1
        shade = [
            (p["t_start"], p["t_end"], p.get("label", p["phase"])) for p in [*ramp, result["burst"], result["recovery"]]
        ]
        files.append(
            plot_lines(
                out / "load-timeline.png",
                seconds,
                counts,
                title="answers per second through the run",
                xlabel="seconds",
                ylabel="answers / s",
                shade=shade,
            ).name
        )
    return files


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    limit_threads(args.threads)
    settings = {
        "device": args.device,
        "dtype": args.dtype,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "max_queue": args.max_queue,
        "max_images_per_request": max(args.images_per_request, min(args.max_queue, 32)),
        "request_timeout_s": args.request_timeout_s,
    }
    result: dict[str, Any] = {
        "benchmark": "load",
        "settings": {
            **settings,
            "backbone": args.backbone,
            "seconds_per_step": args.seconds,
            "max_concurrency": args.max_concurrency,
            "images_per_request": args.images_per_request,
            "reject_pause_ms": args.reject_pause_ms,
            "burst": args.burst,
            "recovery_seconds": args.recovery_seconds,
            "client_timeout_s": args.client_timeout_s,
            "image_format": args.image_format,
            "threads": args.threads,
        },
        "notes": [
            "Closed-loop clients in this process on the same machine as the server; latency percentiles are "
            "of 200 answers; 'timeouts' counts 504 answers plus client-side timeouts.",
            "Clients wait reject_pause_ms after a 429/503 and do not obey Retry-After, so the overload persists.",
        ],
    }
    with tempfile.TemporaryDirectory(prefix="fmlora-load-") as tmp:
        work = Path(tmp)
        bench = make_home(work / "home", args.backbone, tasks=2)
        size = tuple(bench.model.preprocessor.input_size)
        bodies = [
            predict_body(
                [encode_image(im, args.image_format) for im in random_images(args.images_per_request, size, seed=k)]
            )
            for k in range(8)
        ]
        log_path = work / "server.log"
        t_setup = time.perf_counter()
        with ServerProcess(bench.registry.home, settings=settings, threads=args.threads, log_path=log_path) as server:
            result["server_start_s"] = round(time.perf_counter() - t_setup, 3)
            result["launcher"] = server.used_launcher
            with contextlib.suppress(Exception):
                result["server_info"] = server.get_json("/info")
            # Warm-up, not recorded.
            http_load(
                server.url,
                bodies,
                concurrency=2,
                seconds=min(2.0, args.seconds),
                images_per_request=args.images_per_request,
            )
            t0 = time.perf_counter()
            sampler = MetricsSampler(server.url, t0)
            sampler.start()
            events: list[tuple[float, int, float]] = []
            common = {
                "images_per_request": args.images_per_request,
                "timeout_s": args.client_timeout_s,
                "record_events": True,
                "t0": t0,
            }

            def phase(name: str, **kw: Any) -> dict[str, Any]:
                start = time.perf_counter() - t0
                cpu0 = process_cpu_seconds(server.pid)
                res = http_load(server.url, bodies, **common, **kw)
                cpu1 = process_cpu_seconds(server.pid)
                end = time.perf_counter() - t0
                events.extend(res.events)
                cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
                d = _phase(name, res, start, end, sampler, cpu)
                print(
                    f"[load] {name:>8s} c={res.concurrency:<4d} ok {d['ok']:5d} ({d['images_per_s']:8.1f} img/s) "
                    f"429/503 {d['rejected']:5d} timeouts {d['timeouts']:3d} p50 {d['latency']['p50_ms']} "
                    f"p99 {d['latency']['p99_ms']} ms queue max {d['server']['queue_depth_max']}",
                    flush=True,
                )
                return d

            pause = args.reject_pause_ms / 1000.0
            ramp = []
            for c in concurrency_levels(args.max_concurrency):
                step = phase("ramp", concurrency=c, seconds=args.seconds, reject_pause_s=pause)
                step["label"] = f"c={c}"
                ramp.append(step)
            burst = phase("burst", concurrency=args.burst, seconds=0.0, min_requests_per_client=1)
            burst["label"] = "burst"
            recovery = phase("recovery", concurrency=1, seconds=args.recovery_seconds)
            recovery["label"] = "recovery"
            sampler.stop()
            result["server_alive_at_end"] = server.alive()
            with contextlib.suppress(Exception):
                result["server_metrics_end"] = {
                    k: v
                    for k, v in scrape_metrics(server.url).items()
                    if k.startswith(("fmlora_http_requests_total", "fmlora_queue_depth", "fmlora_batch_size_"))
                }
        with contextlib.suppress(OSError):
            (out / "server.log").write_bytes(log_path.read_bytes())
    result["ramp"] = ramp
    result["burst"] = burst
    result["recovery"] = recovery
    result["queue_samples"] = sampler.samples
    result["analysis"] = analyse(ramp, burst, recovery, settings)
    result["_events"] = events
    result["plots"] = plot(result, out)
    write_json(out / "load.json", result)
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per ramp step")
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--backbone", default="offline", help="offline, tiny or a timm name (random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-queue", type=int, default=16, help="server queue bound, in images")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--request-timeout-s", type=float, default=10.0, help="server per-request deadline")
    parser.add_argument("--client-timeout-s", type=float, default=30.0)
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--reject-pause-ms", type=float, default=20.0)
    parser.add_argument("--burst", type=int, default=256, help="requests fired at once after the ramp")
    parser.add_argument("--recovery-seconds", type=float, default=5.0)
    parser.add_argument("--image-format", default="jpeg", choices=["jpeg", "png"])
    parser.add_argument("--threads", type=int, default=None, help="torch/OMP threads here and in the server")
    args = parser.parse_args(argv)
    if args.max_concurrency < 1 or args.images_per_request < 1 or args.burst < 0:
        parser.error("--max-concurrency and --images-per-request must be >= 1, --burst >= 0")
    if args.images_per_request > args.max_queue:
        parser.error("--images-per-request must not exceed --max-queue")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(f"[load] wrote {Path(args.out) / 'load.json'}")
    a = result["analysis"]
    print(f"[load] plateau {a['plateau_images_per_s']} img/s at c={a['plateau_at_concurrency']}; checks {a['checks']}")


if __name__ == "__main__":
    main()
