"""Hot swap under load: publish-to-serving time, latency during a swap storm, zero failed requests.

Against a real server (``fmlora serve --no-worker`` as a child process on a free loopback port, with a
short registry poll interval), concurrent clients (a separate process, asyncio + httpx, closed loop)
send ``POST /predict`` the whole time while this process publishes versions into the registry:

1. ``steady``: no swaps, the latency baseline;
2. ``storm``: ``--swaps`` versions published one after the other (each waits until the server serves
   it, then ``--gap-ms``), a new task every ``--task-every`` swaps and a rollback every
   ``--rollback-every`` swaps (alternately ``POST /models/{v}/activate`` and ``registry.activate``);
3. ``bad``: ``--bad-rounds`` rounds of every bad snapshot kind (corrupted bytes, truncated file,
   another backbone, wrong tensor shape, non-finite tensor, missing file), each made live in the
   registry, followed by a good version: the server must refuse each one (counted in /metrics
   ``fmlora_swaps_failed_total``) and keep serving, with zero failed good requests.

Measured: time from the registry commit to serving (``/readyz``'s ``serving_version``, polled; and the
first client response that carries the new ``model_version``; ``/models``' ``serving`` is checked on
every tenth swap), median and p99; p99 request latency in the storm (and in the windows between a
commit and its serving) against steady state (target <= 1.25x); failed requests (target 0).
Checked on every response: its ``model_version`` was a good version live (in the registry) during the
request or at most ``--max-lag-s`` before it, never a bad or unpublished one; per client, versions
never go backwards except across a rollback.

``--control`` then runs the same again against a second server told to ignore the registry
(``FMLORA_FOLLOW_REGISTRY=false``): the same clients, the same publishes and rollbacks in the same
order and at the same moments, the same readiness polls, but no swap. On a small machine the
publisher and the benchmark compete with the server for CPU; the control's storm p99 is what that
competition costs, so ``swap_added_p99`` (storm p99 over the control's storm p99, each over its own
steady p99) is what swapping itself costs.

    python benchmarks/swap.py --out runs/swap [--swaps 200] [--clients 8] [--seconds N] [--control]

Writes ``swap.json`` and ``swap.png`` (latency over time with swap marks) in ``--out``.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import multiprocessing
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.loadgen import encode_image, random_images
from benchmarks.report import ratio, summarize, write_json

__all__ = [
    "LoadGenerator",
    "Request",
    "SwapConfig",
    "analyze",
    "metric_value",
    "run_swap",
]


# -- the load generator (a separate process: publishing here must not steal the clients' GIL) ---------
@dataclass(frozen=True)
class Request:
    client: int
    t0: float  # time.monotonic() before sending (CLOCK_MONOTONIC: comparable across processes)
    t1: float  # after the full response was read
    status: int  # HTTP status; 0: no response (connection error, timeout); -1: 200 with a malformed body
    version: int | None
    detail: str = ""


def _client_loop(
    url: str,
    clients: int,
    bodies: list[bytes],
    headers: dict[str, str],
    think_s: float,
    timeout_s: float,
    stop: Any,
    started: Any,
    conn: Any,
) -> None:
    import asyncio

    import httpx

    records: list[tuple[Any, ...]] = []
    hdrs = {"Content-Type": "application/json", **headers}

    async def client(index: int) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
            k = 0
            while not stop.is_set():
                body = bodies[(index + k) % len(bodies)]
                k += 1
                t0 = time.monotonic()
                try:
                    response = await http.post("/predict", content=body, headers=hdrs)
                    t1 = time.monotonic()
                except Exception as exc:
                    records.append((index, t0, time.monotonic(), 0, None, type(exc).__name__))
                    await asyncio.sleep(0.01)
                    continue
                status, version, detail = response.status_code, None, ""
                if status == 200:
                    try:
                        payload = response.json()
                        version = payload["model_version"]
                        results = payload["results"]
                        if not isinstance(version, int) or len(results) != 1 or not results[0]["predictions"]:
                            raise ValueError("unexpected response shape")
                    except Exception as exc:
                        status, detail = -1, f"malformed: {exc}"[:200]
                else:
                    detail = response.text[:200]
                records.append((index, t0, t1, status, version, detail))
                started.set()
                if think_s:
                    await asyncio.sleep(think_s)

    async def main() -> None:
        await asyncio.gather(*(client(i) for i in range(clients)))

    try:
        asyncio.run(main())
    finally:
        conn.send(records)
        conn.close()


class LoadGenerator:
    """``clients`` closed-loop clients posting ``bodies`` (round robin) to ``url`` + /predict, in a
    child process, until ``stop()`` (which returns every request made)."""

    def __init__(
        self,
        url: str,
        clients: int,
        bodies: Sequence[bytes],
        *,
        headers: Mapping[str, str] | None = None,
        think_s: float = 0.0,
        timeout_s: float = 60.0,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._started = ctx.Event()
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_client_loop,
            args=(url, clients, list(bodies), dict(headers or {}), think_s, timeout_s, self._stop, self._started, send),
            name="fmlora-load",
            daemon=True,
        )
        self._send = send

    def start(self, timeout_s: float = 120.0) -> LoadGenerator:
        """Start the clients; returns once the first response has arrived."""
        self._proc.start()
        self._send.close()
        deadline = time.monotonic() + timeout_s
        while not self._started.wait(0.1):
            if not self._proc.is_alive() or time.monotonic() > deadline:
                self.stop(5)
                raise RuntimeError("the load generator did not get a first response")
        return self

    def stop(self, timeout_s: float = 120.0) -> list[Request]:
        self._stop.set()
        records: list[tuple[Any, ...]] = []
        if self._recv.poll(timeout_s):
            records = self._recv.recv()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        return [Request(*r) for r in records]


def predict_bodies(size: Sequence[int], n: int = 8, seed: int = 0) -> list[bytes]:
    """``n`` JSON bodies of POST /predict, one PNG image each at ``size`` (H, W)."""
    images = random_images(n, (int(size[0]), int(size[1])), seed)
    return [
        json.dumps({"images": [base64.b64encode(encode_image(a, "png")).decode()], "top_k": 3}).encode() for a in images
    ]


# -- talking to the server --------------------------------------------------------------------------
_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)\s*$")


def metric_value(text: str, name: str, labels: str | None = None) -> float | None:
    """The value of sample ``name`` (with exactly the label string ``labels``, e.g. '{outcome="ok"}')."""
    for line in text.splitlines():
        match = _METRIC.match(line)
        if match and match.group(1) == name and (match.group(2) or None) == labels:
            return float(match.group(3))
    return None


class Control:
    """The benchmark's own HTTP calls (readiness polls, metrics, activation), over one keep-alive connection."""

    def __init__(self, url: str, admin_key: str) -> None:
        import httpx

        self.http = httpx.Client(base_url=url, timeout=30.0)
        self.admin = {"Authorization": f"Bearer {admin_key}"}
        self.not_ready = 0  # /readyz answers other than 200 (readiness must hold during swaps)
        self.polls = 0

    def serving(self) -> int | None:
        self.polls += 1
        response = self.http.get("/readyz")
        if response.status_code != 200:
            self.not_ready += 1
            return None
        return response.json().get("serving_version")

    def wait_serving(self, version: int, timeout_s: float, interval_s: float = 0.005) -> float | None:
        """Poll until the server serves ``version``; the monotonic time it was first seen, or None."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.serving() == version:
                return time.monotonic()
            time.sleep(interval_s)
        return None

    def models_serving(self) -> int | None:
        response = self.http.get("/models", headers=self.admin)
        return response.json().get("serving") if response.status_code == 200 else None

    def metrics(self) -> str:
        return self.http.get("/metrics").text

    def swaps_failed(self) -> float:
        return metric_value(self.metrics(), "fmlora_swaps_failed_total") or 0.0

    def activate(self, version: int) -> dict[str, Any]:
        response = self.http.post(f"/models/{version}/activate", headers=self.admin)
        response.raise_for_status()
        return response.json()

    def close(self) -> None:
        self.http.close()


# -- analysis ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LiveEvent:
    """The registry's live pointer moved to ``version`` at ``at`` (monotonic); bad ones are refused."""

    at: float
    version: int
    good: bool
    rollback: bool = False


def _good_intervals(events: Sequence[LiveEvent], end: float) -> dict[int, list[tuple[float, float]]]:
    """For each good version, the intervals during which it was the newest good live version (bad
    versions never serve: the server keeps the previous good one)."""
    good = sorted((e for e in events if e.good), key=lambda e: e.at)
    intervals: dict[int, list[tuple[float, float]]] = {}
    for i, e in enumerate(good):
        stop = good[i + 1].at if i + 1 < len(good) else end
        intervals.setdefault(e.version, []).append((e.at, stop))
    return intervals


def analyze(
    requests: Sequence[Request],
    events: Sequence[LiveEvent],
    *,
    max_lag_s: float,
    end: float | None = None,
) -> dict[str, Any]:
    """Check every successful response against the live history.

    - ``never_live``: a version that was never a good live version before the response arrived (a bad
      snapshot served, or a version from the future);
    - ``stale``: a version that had stopped being live more than ``max_lag_s`` before the request began;
    - ``backwards``: per client, a version lower than the previous response's without a rollback
      committed between the previous request's start (less ``max_lag_s``) and this response's end.
    """
    end = end if end is not None else max((r.t1 for r in requests), default=0.0) + 1.0
    intervals = _good_intervals(events, end)
    rollbacks = sorted(e.at for e in events if e.rollback)
    never_live: list[dict[str, Any]] = []
    stale: list[dict[str, Any]] = []
    max_staleness = 0.0
    for r in requests:
        if r.status != 200:
            continue
        spans = [s for s in intervals.get(r.version, []) if s[0] <= r.t1] if r.version is not None else []
        if not spans:
            never_live.append(asdict(r))
            continue
        if any(a <= r.t1 and b >= r.t0 for a, b in spans):
            continue  # live during the request
        staleness = r.t0 - max(b for _, b in spans)
        max_staleness = max(max_staleness, staleness)
        if staleness > max_lag_s:
            stale.append({**asdict(r), "staleness_s": round(staleness, 4)})
    backwards: list[dict[str, Any]] = []
    by_client: dict[int, list[Request]] = {}
    for r in requests:
        if r.status == 200:
            by_client.setdefault(r.client, []).append(r)
    for seq in by_client.values():
        seq.sort(key=lambda r: r.t0)
        for prev, cur in itertools.pairwise(seq):
            if cur.version is not None and prev.version is not None and cur.version < prev.version:
                lo, hi = prev.t0 - max_lag_s, cur.t1
                if not any(lo <= t <= hi for t in rollbacks):
                    backwards.append({"previous": asdict(prev), "current": asdict(cur)})
    return {
        "checked": sum(1 for r in requests if r.status == 200),
        "never_live": len(never_live),
        "stale": len(stale),
        "backwards": len(backwards),
        "max_staleness_s": round(max_staleness, 4),
        "examples": {"never_live": never_live[:5], "stale": stale[:5], "backwards": backwards[:5]},
    }


def first_response_after(requests: Sequence[Request], version: int, after: float) -> float | None:
    """When the first response carrying ``version`` arrived after ``after`` (None if none did)."""
    times = [r.t1 for r in requests if r.status == 200 and r.version == version and r.t1 >= after]
    return min(times) if times else None


def _summary_s(values: Iterable[float | None]) -> dict[str, Any]:
    return summarize([v for v in values if v is not None])


# -- the run -------------------------------------------------------------------------------------------
@dataclass
class SwapConfig:
    out: Path
    swaps: int = 200
    clients: int = 8
    seconds: float | None = None  # spread the storm over this long (sets the gap between swaps)
    gap_ms: float = 50.0
    steady_s: float = 20.0
    warmup_s: float = 3.0
    rollback_every: int = 10
    task_every: int = 10
    bad_rounds: int = 2
    bad_kinds: tuple[str, ...] | None = None  # default: every kind in benchmarks.publish.BAD_KINDS
    backbone: str = "offline"
    device: str = "cpu"
    dtype: str = "auto"
    threads: int | None = 1
    poll_interval_s: float = 0.02
    max_lag_s: float = 5.0
    swap_timeout_s: float = 60.0
    think_ms: float = 0.0
    models_check_every: int = 10
    seed: int = 0
    plot: bool = True
    keep_home: bool = False
    server_settings: dict[str, Any] = field(default_factory=dict)
    control: bool = False  # then replay the storm against a server that ignores the registry


def run_swap(cfg: SwapConfig) -> dict[str, Any]:
    """Run the three phases against a fresh server and home (and the control run after them, with
    ``cfg.control``); returns (and writes) the results."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    work = Path(tempfile.mkdtemp(prefix="fmlora-swap-"))
    try:
        result = _run_swap(cfg, out, work, rng)
        if cfg.control:
            result.update(_with_control(result, _run_control(cfg, result["swaps"], out, work / "control")))
            write_json(out / "swap.json", result)
        return result
    finally:
        if not cfg.keep_home:
            shutil.rmtree(work, ignore_errors=True)


def _run_control(cfg: SwapConfig, plan: Sequence[Mapping[str, Any]], out: Path, work: Path) -> dict[str, Any]:
    """The storm of ``plan`` (the real run's swap rows) replayed against a server that ignores the
    registry: same publishes, rollbacks, readiness polls and pauses, at the same pace; no swap."""
    from benchmarks.models import model_config
    from benchmarks.processes import ServerProcess
    from benchmarks.publish import Publisher
    from fmlora.registry.registry import Registry

    registry = Registry.open(work / "home", model_config(cfg.backbone, work / "weights"))
    publisher = Publisher(registry, seed=cfg.seed)
    publisher.publish(new_task=True)
    publisher.publish(new_task=True)
    size = publisher.model.preprocessor.input_size
    settings = {"poll_interval_s": cfg.poll_interval_s, "device": cfg.device, "dtype": cfg.dtype}
    settings.update(cfg.server_settings, follow_registry=False)
    gap = cfg.seconds / max(1, cfg.swaps) if cfg.seconds else cfg.gap_ms / 1000
    phases: dict[str, tuple[float, float]] = {}
    mismatched = 0
    log_path = out / "server-control.log"
    with ServerProcess(work / "home", settings=settings, threads=cfg.threads, log_path=log_path) as server:
        control = Control(server.url, server.admin_key)
        load = LoadGenerator(server.url, cfg.clients, predict_bodies(size, seed=cfg.seed), think_s=cfg.think_ms / 1000)
        load.start()
        try:
            for name, seconds in (("warmup", cfg.warmup_s), ("steady", cfg.steady_s)):
                a = time.monotonic()
                time.sleep(seconds)
                phases[name] = (a, time.monotonic())
            a = time.monotonic()
            for row in plan:
                started = time.monotonic()
                kind, version = row["kind"], row["version"]
                if kind == "rollback-http":
                    control.activate(version)
                elif kind == "rollback-registry":
                    publisher.rollback(version)
                else:
                    mismatched += publisher.publish(new_task=kind == "task").version != version
                polled_until = time.monotonic() + (row["served_poll_s"] or 0.0)
                control.serving()  # as wait_serving polls in the real run, for as long as it did there
                while time.monotonic() < polled_until:
                    time.sleep(0.005)
                    control.serving()
                if "models_serving" in row:
                    control.models_serving()
                remaining = gap - (time.monotonic() - started)
                if remaining > 0:
                    time.sleep(remaining)
            phases["storm"] = (a, time.monotonic())
            a = time.monotonic()
            time.sleep(min(2.0, cfg.warmup_s))
            phases["tail"] = (a, time.monotonic())
            served = control.serving()
        finally:
            requests = load.stop()
            control.close()
    latency: dict[str, dict[str, Any]] = {}
    for name, (a, b) in phases.items():
        rs = [r for r in requests if a <= r.t0 < b]
        latency[name] = summarize([r.t1 - r.t0 for r in rs if r.status == 200])
        latency[name]["failed"] = sum(1 for r in rs if r.status != 200)
        latency[name]["throughput_rps"] = round(len(rs) / (b - a), 2) if b > a else None
    return {
        "requests": {"total": len(requests), "failed": sum(1 for r in requests if r.status != 200)},
        "latency_ms": latency,
        "served_at_end": served,  # the version live at start: the control never swapped
        "replayed": len(plan),
        "version_mismatches": mismatched,
        "phases_s": {k: round(b - a, 3) for k, (a, b) in phases.items()},
    }


def _with_control(result: Mapping[str, Any], control: dict[str, Any]) -> dict[str, Any]:
    """What swapping itself adds to the storm's p99, beyond publishing next to the server."""
    p99 = {
        (run, phase): latency.get(phase, {}).get("p99_ms")
        for run, latency in (("swap", result["latency_ms"]), ("control", control["latency_ms"]))
        for phase in ("steady", "storm")
    }
    control["p99_storm_over_steady"] = ratio(p99["control", "storm"], p99["control", "steady"])
    raw = ratio(p99["swap", "storm"], p99["control", "storm"])
    normalized = ratio(result["p99_storm_over_steady"], control["p99_storm_over_steady"])
    targets = dict(result["targets"])
    targets["swap_added_p99_le_10pct"] = None if normalized is None else normalized <= 1.10
    targets["control_failed_requests_zero"] = control["requests"]["failed"] == 0
    return {
        "control": control,
        "p99_storm_over_control_storm": raw,
        "swap_added_p99": None if normalized is None else round(normalized - 1, 3),
        "targets": targets,
    }


def _run_swap(cfg: SwapConfig, out: Path, work: Path, rng: random.Random) -> dict[str, Any]:
    from benchmarks.models import model_config
    from benchmarks.processes import ServerProcess
    from benchmarks.publish import BAD_KINDS, Publisher
    from fmlora.registry.registry import Registry

    registry = Registry.open(work / "home", model_config(cfg.backbone, work / "weights"))
    publisher = Publisher(registry, seed=cfg.seed)
    publisher.publish(new_task=True)
    publisher.publish(new_task=True)
    size = publisher.model.preprocessor.input_size
    settings = {"poll_interval_s": cfg.poll_interval_s, "device": cfg.device, "dtype": cfg.dtype}
    settings.update(cfg.server_settings)
    bad_kinds = tuple(cfg.bad_kinds) if cfg.bad_kinds is not None else BAD_KINDS
    phases: dict[str, tuple[float, float]] = {}
    swaps: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    events = [LiveEvent(p.committed_at, p.version, p.good, p.kind == "rollback") for p in publisher.history]

    with ServerProcess(work / "home", settings=settings, threads=cfg.threads, log_path=out / "server.log") as server:
        control = Control(server.url, server.admin_key)
        load = LoadGenerator(server.url, cfg.clients, predict_bodies(size, seed=cfg.seed), think_s=cfg.think_ms / 1000)
        load.start()
        try:
            t_start = time.monotonic()
            time.sleep(cfg.warmup_s)
            phases["warmup"] = (t_start, time.monotonic())
            a = time.monotonic()
            time.sleep(cfg.steady_s)
            phases["steady"] = (a, time.monotonic())

            # -- storm ---------------------------------------------------------------------------
            a = time.monotonic()
            gap = cfg.gap_ms / 1000
            if cfg.seconds:
                gap = max(0.0, cfg.seconds / max(1, cfg.swaps))
            via_http = True
            for i in range(cfg.swaps):
                started = time.monotonic()
                good = publisher.good_versions
                current = control.serving()
                if cfg.rollback_every and i % cfg.rollback_every == cfg.rollback_every - 1 and len(good) > 1:
                    target = rng.choice([v for v in good[-8:] if v != current] or good[:1])
                    if via_http:
                        sent = time.monotonic()
                        control.activate(target)
                        item = publisher.note_rollback(target, sent)
                        kind = "rollback-http"
                    else:
                        item = publisher.rollback(target)
                        kind = "rollback-registry"
                    via_http = not via_http
                else:
                    item = publisher.publish(new_task=(cfg.task_every > 0 and i % cfg.task_every == 0))
                    kind = item.kind
                events.append(LiveEvent(item.committed_at, item.version, True, item.kind == "rollback"))
                seen = control.wait_serving(item.version, cfg.swap_timeout_s)
                row = {
                    "index": i,
                    "version": item.version,
                    "kind": kind,
                    "committed_at": item.committed_at,
                    "publish_seconds": round(item.seconds, 5),
                    "served_poll_s": None if seen is None else seen - item.committed_at,
                }
                if cfg.models_check_every and i % cfg.models_check_every == 0:
                    row["models_serving"] = control.models_serving()
                swaps.append(row)
                remaining = gap - (time.monotonic() - started)
                if remaining > 0:
                    time.sleep(remaining)
            phases["storm"] = (a, time.monotonic())

            # -- bad snapshots -------------------------------------------------------------------
            a = time.monotonic()
            failed_before = control.swaps_failed()
            for _ in range(cfg.bad_rounds):
                for kind in bad_kinds:
                    before = control.swaps_failed()
                    item = publisher.publish_bad(kind)
                    events.append(LiveEvent(item.committed_at, item.version, False))
                    refused_at = None
                    deadline = time.monotonic() + cfg.swap_timeout_s
                    while time.monotonic() < deadline:
                        if control.swaps_failed() > before:
                            refused_at = time.monotonic()
                            break
                        time.sleep(0.01)
                    still = control.serving()
                    good_item = publisher.publish(new_task=False)
                    events.append(LiveEvent(good_item.committed_at, good_item.version, True))
                    seen = control.wait_serving(good_item.version, cfg.swap_timeout_s)
                    bad.append(
                        {
                            "kind": kind,
                            "version": item.version,
                            "refused": refused_at is not None,
                            "refused_after_s": None if refused_at is None else refused_at - item.committed_at,
                            "serving_while_bad_live": still,
                            "next_good_version": good_item.version,
                            "next_good_served_s": None if seen is None else seen - good_item.committed_at,
                        }
                    )
            refused_total = control.swaps_failed() - failed_before
            phases["bad"] = (a, time.monotonic())
            a = time.monotonic()
            time.sleep(min(2.0, cfg.warmup_s))
            phases["tail"] = (a, time.monotonic())
            metrics_text = control.metrics()
        finally:
            requests = load.stop()
            control_stats = {"readyz_polls": control.polls, "readyz_not_ready": control.not_ready}
            control.close()
        alive = server.alive()
        launcher = server.used_launcher

    end = time.monotonic()
    result = _report(cfg, requests, events, phases, swaps, bad, metrics_text, end)
    result["bad"]["refused_by_metrics"] = refused_total
    result["bad"]["all_refused_counted"] = refused_total == len(bad) and all(b["refused"] for b in bad)
    result["server"] = {
        "launcher": launcher,
        "alive_at_end": alive,
        "settings": settings,
        "threads": cfg.threads,
        "backbone": cfg.backbone,
        **control_stats,
    }
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    write_json(out / "swap.json", result)
    if cfg.plot:
        plot_timeline(out / "swap.png", requests, phases, events, t0=phases["warmup"][0])
    return result


def _phase_of(t: float, phases: Mapping[str, tuple[float, float]]) -> str | None:
    for name, (a, b) in phases.items():
        if a <= t < b:
            return name
    return None


def _report(
    cfg: SwapConfig,
    requests: Sequence[Request],
    events: Sequence[LiveEvent],
    phases: Mapping[str, tuple[float, float]],
    swaps: list[dict[str, Any]],
    bad: list[dict[str, Any]],
    metrics_text: str,
    end: float,
) -> dict[str, Any]:
    by_phase: dict[str, list[Request]] = {name: [] for name in phases}
    for r in requests:
        name = _phase_of(r.t0, phases)
        if name is not None:
            by_phase[name].append(r)
    failures = [r for r in requests if r.status != 200]
    latency = {name: summarize([r.t1 - r.t0 for r in rs if r.status == 200]) for name, rs in by_phase.items()}
    for name, rs in by_phase.items():
        latency[name]["failed"] = sum(1 for r in rs if r.status != 200)
        span = phases[name][1] - phases[name][0]
        latency[name]["throughput_rps"] = round(len(rs) / span, 2) if span > 0 else None
    # Requests that overlap a swap window (commit → served): the ones a swap could slow down.
    windows = [
        (s["committed_at"], s["committed_at"] + s["served_poll_s"]) for s in swaps if s["served_poll_s"] is not None
    ]
    in_window = [r for r in requests if r.status == 200 and any(r.t0 <= b and r.t1 >= a for a, b in windows)]
    swap_window = summarize([r.t1 - r.t0 for r in in_window])
    for s in swaps:
        first = first_response_after(requests, s["version"], s["committed_at"])
        s["served_first_response_s"] = None if first is None else first - s["committed_at"]
    publishes = [s for s in swaps if not s["kind"].startswith("rollback")]
    rollbacks = [s for s in swaps if s["kind"].startswith("rollback")]
    models_checked = [s for s in swaps if "models_serving" in s]
    steady_p99 = latency.get("steady", {}).get("p99_ms")
    storm_p99 = latency.get("storm", {}).get("p99_ms")
    ratio = None if not steady_p99 or storm_p99 is None else round(storm_p99 / steady_p99, 3)
    window_ratio = (
        None if not steady_p99 or swap_window["p99_ms"] is None else round(swap_window["p99_ms"] / steady_p99, 3)
    )
    checks = analyze(requests, events, max_lag_s=cfg.max_lag_s, end=end)
    bad_phase = by_phase.get("bad", [])
    return {
        "benchmark": "swap",
        "requests": {
            "total": len(requests),
            "ok": len(requests) - len(failures),
            "failed": len(failures),
            "failed_by_status": _count(str(r.status) for r in failures),
            "failed_examples": [asdict(r) for r in failures[:5]],
        },
        "latency_ms": latency,
        "swap_window_latency_ms": swap_window,
        "p99_storm_over_steady": ratio,
        "p99_swap_windows_over_steady": window_ratio,
        "publish_to_serving_s": {
            "swaps": len(publishes),
            "not_served": sum(1 for s in publishes if s["served_poll_s"] is None),
            "readyz_poll": _summary_s(s["served_poll_s"] for s in publishes),
            "first_response": _summary_s(s["served_first_response_s"] for s in publishes),
        },
        "rollback_to_serving_s": {
            "rollbacks": len(rollbacks),
            "not_served": sum(1 for s in rollbacks if s["served_poll_s"] is None),
            "readyz_poll": _summary_s(s["served_poll_s"] for s in rollbacks),
            "first_response": _summary_s(s["served_first_response_s"] for s in rollbacks),
        },
        "models_serving_checks": {
            "checked": len(models_checked),
            "mismatched": sum(1 for s in models_checked if s["models_serving"] != s["version"]),
        },
        "version_checks": checks,
        "bad": {
            "published": len(bad),
            "by_kind": _count(b["kind"] for b in bad),
            "refused": sum(1 for b in bad if b["refused"]),
            "refusal_s": _summary_s(b["refused_after_s"] for b in bad),
            "good_requests_during": sum(1 for r in bad_phase if r.status == 200),
            "failed_requests_during": sum(1 for r in bad_phase if r.status != 200),
            "rows": bad,
        },
        "server_metrics": {
            "swaps_total": metric_value(metrics_text, "fmlora_swaps_total"),
            "swaps_failed_total": metric_value(metrics_text, "fmlora_swaps_failed_total"),
            "serving_version": metric_value(metrics_text, "fmlora_serving_version"),
        },
        "targets": {
            "failed_requests_zero": len(failures) == 0,
            "p99_storm_over_steady_le_1.25": None if ratio is None else ratio <= 1.25,
            "versions_consistent": checks["never_live"] == 0 and checks["stale"] == 0 and checks["backwards"] == 0,
        },
        "swaps": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in s.items()} for s in swaps],
        "phases_s": {k: round(b - a, 3) for k, (a, b) in phases.items()},
    }


def _count(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def plot_timeline(
    path: Path,
    requests: Sequence[Request],
    phases: Mapping[str, tuple[float, float]],
    events: Sequence[LiveEvent],
    *,
    t0: float,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    ok = [r for r in requests if r.status == 200]
    ax.scatter([r.t1 - t0 for r in ok], [(r.t1 - r.t0) * 1000 for r in ok], s=2, alpha=0.35, label="request (200)")
    failed = [r for r in requests if r.status != 200]
    if failed:
        ax.scatter(
            [r.t1 - t0 for r in failed], [(r.t1 - r.t0) * 1000 for r in failed], s=12, c="red", label="failed request"
        )
    marks = {"publish": ("tab:green", 0.25), "rollback": ("tab:blue", 0.6), "bad": ("tab:red", 0.6)}
    used: set[str] = set()
    for e in events:
        if e.at < t0:
            continue
        key = "bad" if not e.good else "rollback" if e.rollback else "publish"
        color, alpha = marks[key]
        ax.axvline(e.at - t0, color=color, alpha=alpha, linewidth=0.6, label=None if key in used else f"{key} (commit)")
        used.add(key)
    for name, (a, b) in phases.items():
        ax.annotate(name, ((a + b) / 2 - t0, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom")
        ax.axvline(a - t0, color="black", linewidth=1.0, linestyle=":")
    ax.set_xlabel("seconds since the clients started")
    ax.set_ylabel("request latency (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--swaps", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=None, help="spread the storm's swaps over this many seconds")
    p.add_argument("--gap-ms", type=float, default=50.0, help="pause after each swap is served (without --seconds)")
    p.add_argument("--steady-seconds", type=float, default=20.0)
    p.add_argument("--rollback-every", type=int, default=10)
    p.add_argument("--task-every", type=int, default=10, help="a new task every N swaps (else re-publish)")
    p.add_argument("--bad-rounds", type=int, default=2)
    p.add_argument("--backbone", default="offline", help="offline (shipped glyph ViT), tiny, or a timm ViT name")
    p.add_argument("--device", default="cpu", help="server device: cpu, cuda, auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the server process (0: no limit)")
    p.add_argument("--poll-interval", type=float, default=0.02, help="the server's registry poll interval (s)")
    p.add_argument("--max-lag-s", type=float, default=5.0)
    p.add_argument("--think-ms", type=float, default=0.0, help="pause between a client's requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--control", action="store_true", help="also replay the storm on a server that ignores it")
    args = p.parse_args(argv)
    cfg = SwapConfig(
        out=args.out,
        swaps=args.swaps,
        clients=args.clients,
        seconds=args.seconds,
        gap_ms=args.gap_ms,
        steady_s=args.steady_seconds,
        rollback_every=args.rollback_every,
        task_every=args.task_every,
        bad_rounds=args.bad_rounds,
        backbone=args.backbone,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads or None,
        poll_interval_s=args.poll_interval,
        max_lag_s=args.max_lag_s,
        think_ms=args.think_ms,
        seed=args.seed,
        control=args.control,
    )
    result = run_swap(cfg)
    brief = {
        "requests": result["requests"]["total"],
        "failed": result["requests"]["failed"],
        "p99_steady_ms": result["latency_ms"].get("steady", {}).get("p99_ms"),
        "p99_storm_ms": result["latency_ms"].get("storm", {}).get("p99_ms"),
        "p99_storm_over_steady": result["p99_storm_over_steady"],
        "publish_to_serving_p50_ms": result["publish_to_serving_s"]["readyz_poll"]["p50_ms"],
        "publish_to_serving_p99_ms": result["publish_to_serving_s"]["readyz_poll"]["p99_ms"],
        "version_checks": {k: result["version_checks"][k] for k in ("never_live", "stale", "backwards")},
        "bad_published": result["bad"]["published"],
        "bad_refused_by_metrics": result["bad"]["refused_by_metrics"],
    }
    if cfg.control:
        latency = result["control"]["latency_ms"]
        brief["control"] = {
            "failed": result["control"]["requests"]["failed"],
            "p99_steady_ms": latency["steady"]["p99_ms"],
            "p99_storm_ms": latency["storm"]["p99_ms"],
            "p99_storm_over_steady": result["control"]["p99_storm_over_steady"],
        }
        brief["swap_added_p99"] = result["swap_added_p99"]
    print(json.dumps(brief, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
