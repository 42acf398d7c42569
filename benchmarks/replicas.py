"""Replicas converging on a version: N ``fmlora serve --no-worker`` processes on one PostgreSQL and one
S3 endpoint (moto's server on 127.0.0.1), a load generator spread over them, publishes and rollbacks.

    python -m benchmarks.replicas                      # short: 30 publishes, 6 rollbacks
    python -m benchmarks.replicas --publishes 100 --rollbacks 20

Measures, per publish or rollback, the time from the registry commit to every replica serving it
(each replica's GET /readyz ``serving_version``; p50/p99 over events); failed requests during the run;
"regressions": a response from a version that the same replica had already replaced (every answer's
version is placed in the sequence of live versions by commit time; the place must never go back on
one replica); and the throughput of one replica on PostgreSQL against one on SQLite serving the same
snapshot (ratio in one run: the registry is not on the predict path). Writes JSON.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.loadgen import encode_image, http_load, predict_body, random_images
from benchmarks.models import model_config
from benchmarks.processes import ServerProcess
from benchmarks.publish import Publisher
from benchmarks.report import ratio, summarize, write_json
from fmlora.registry.publish import publish_version
from fmlora.registry.registry import Registry

__all__ = ["main", "run"]

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class _Load:
    """One client thread per replica, POSTing back to back; keeps (replica, time, status, version)."""

    def __init__(self, urls: list[str], body: bytes) -> None:
        self.urls, self.body = urls, body
        self.answers: list[tuple[int, float, int, int | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(len(urls))]

    def _client(self, index: int) -> None:
        with httpx.Client(timeout=30.0) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(
                        self.urls[index] + "/predict", content=self.body, headers={"content-type": "application/json"}
                    )
                    version = r.json().get("model_version") if r.status_code == 200 else None
                    self.answers.append((index, time.monotonic(), r.status_code, version))
                except httpx.HTTPError:
                    self.answers.append((index, time.monotonic(), 0, None))

    def __enter__(self) -> _Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def _serving(url: str) -> int | None:
    try:
        return httpx.get(url + "/readyz", timeout=5.0).json().get("serving_version")
    except (httpx.HTTPError, ValueError):
        return None


def _converge(urls: list[str], version: int, committed: float, timeout_s: float) -> float | None:
    """Seconds from ``committed`` until every replica serves ``version`` (None: not within the timeout)."""
    pending = set(range(len(urls)))
    last = committed
    while pending and time.monotonic() - committed < timeout_s:
        for i in list(pending):
            if _serving(urls[i]) == version:
                pending.discard(i)
                last = time.monotonic()
        if pending:
            time.sleep(0.005)
    return None if pending else last - committed


def _regressions(answers: list[tuple[int, float, int, int | None]], timeline: list[tuple[float, int]]) -> int:
    """Answers whose version sits earlier in the live sequence than one the same replica already served."""
    timeline = sorted(timeline)
    worst = 0
    seen: dict[int, int] = {}
    for replica, at, status, version in sorted(answers, key=lambda a: a[1]):
        if status != 200 or version is None:
            continue
        places = [k for k, (t, v) in enumerate(timeline) if v == version and t <= at]
        place = places[-1] if places else -1
        if place < seen.get(replica, -1):
            worst += 1
        seen[replica] = max(seen.get(replica, -1), place)
    return worst


def run(
    publishes: int = 30,
    rollbacks: int = 6,
    replicas: int = 3,
    backbone: str = "tiny",
    throughput_s: float = 5.0,
    poll_interval_s: float = 0.5,
    work: Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    from tests.integration.registry.services import PostgresCluster, moto_s3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every S3 request otherwise
    work = work or Path(tempfile.mkdtemp(prefix="fmlora-replicas-"))
    cluster = PostgresCluster()
    s3 = moto_s3()
    servers: list[ServerProcess] = []
    try:
        database = cluster.create_database()
        pg_url, store_url = cluster.url(database), f"s3://{s3.create_bucket()}/fmlora"
        config = model_config(backbone, work / "weights")
        registry = Registry.open(work / "publisher", config, registry_url=pg_url, store_url=store_url, s3=s3.options())
        publisher = Publisher(registry, seed=seed)
        publisher.publish(new_task=True)
        (work / "model.json").write_text(config.model_dump_json())
        common = {
            "device": "cpu",
            "poll_interval_s": poll_interval_s,
            "model_config_file": str(work / "model.json"),
            "max_wait_ms": 1.0,
        }
        remote = {
            "registry_url": pg_url,
            "store_url": store_url,
            "s3_endpoint_url": s3.endpoint,
            "s3_region": "us-east-1",
            "s3_addressing_style": "path",
        }
        for i in range(replicas):
            servers.append(
                ServerProcess(work / f"replica{i}", settings={**common, **remote}, threads=1, env=AWS).start(False)
            )
        for server in servers:
            server.wait_ready()
        urls = [s.url for s in servers]
        image = encode_image(random_images(1, 32 if backbone == "tiny" else 224, seed=seed)[0])
        body = predict_body([image], top_k=1)

        rng = random.Random(seed)
        kinds = ["publish"] * publishes + ["rollback"] * rollbacks
        rng.shuffle(kinds)
        timeline = [(publisher.history[0].committed_at, publisher.history[0].version)]
        events: list[dict[str, Any]] = []
        with _Load(urls, body) as load:
            time.sleep(0.5)
            for kind in kinds:
                live = timeline[-1][1]
                earlier = [v for v in publisher.good_versions if v != live]
                if kind == "rollback" and earlier:
                    done = publisher.rollback(rng.choice(earlier[-5:]))
                else:
                    kind = "publish"
                    done = publisher.publish(new_task=rng.random() < 0.2)
                timeline.append((done.committed_at, done.version))
                seconds = _converge(urls, done.version, done.committed_at, timeout_s=30.0)
                events.append({"kind": kind, "version": done.version, "converged_s": seconds})
            time.sleep(0.5)
        answers = load.answers
        converged = [e["converged_s"] for e in events if e["converged_s"] is not None]
        failed = sum(1 for a in answers if a[2] != 200)

        # Throughput: replica 0 (PostgreSQL + S3) against a replica on SQLite serving the same snapshot.
        local = Registry.open(work / "sqlite-home", config)
        publish_version(local, publisher.model, card={}, parent=None)
        sqlite_server = ServerProcess(work / "sqlite-home", settings=common, threads=1).start()
        servers.append(sqlite_server)
        for server in servers[1:replicas]:
            server.stop()
        pg_load = http_load(urls[0], body, concurrency=4, seconds=throughput_s)
        sqlite_load = http_load(sqlite_server.url, body, concurrency=4, seconds=throughput_s)
        return {
            "benchmark": "replicas",
            "setup": {
                "replicas": replicas,
                "backbone": backbone,
                "registry": "postgresql (throwaway cluster, 127.0.0.1)",
                "store": "s3 (moto ThreadedMotoServer, 127.0.0.1)",
                "poll_interval_s": poll_interval_s,
                "publishes": sum(1 for e in events if e["kind"] == "publish"),
                "rollbacks": sum(1 for e in events if e["kind"] == "rollback"),
            },
            "convergence": {**summarize(converged), "not_converged": len(events) - len(converged)},
            "requests": {"total": len(answers), "failed": failed},
            "regressions": _regressions(answers, timeline),
            "throughput": {
                "postgresql_images_per_s": round(pg_load.images_per_s, 2),
                "sqlite_images_per_s": round(sqlite_load.images_per_s, 2),
                "ratio_postgresql_over_sqlite": ratio(pg_load.images_per_s, sqlite_load.images_per_s),
                "postgresql_failed": pg_load.requests - pg_load.ok,
                "sqlite_failed": sqlite_load.requests - sqlite_load.ok,
            },
            "events": events,
        }
    finally:
        for server in servers:
            server.stop()
        cluster.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--publishes", type=int, default=30)
    parser.add_argument("--rollbacks", type=int, default=6)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--backbone", default="tiny", help="tiny (default), offline, or a timm name")
    parser.add_argument("--throughput-s", type=float, default=5.0)
    parser.add_argument("--poll-interval-s", type=float, default=0.5, help="the polling fallback's interval")
    parser.add_argument("--out", default="benchmarks/results/replicas.json")
    args = parser.parse_args(argv)
    result = run(args.publishes, args.rollbacks, args.replicas, args.backbone, args.throughput_s, args.poll_interval_s)
    path = write_json(args.out, result)
    conv, req = result["convergence"], result["requests"]
    print(
        f"convergence p50 {conv['p50_ms']} ms, p99 {conv['p99_ms']} ms ({conv['not_converged']} not converged); "
        f"requests {req['total']}, failed {req['failed']}; regressions {result['regressions']}; "
        f"throughput PostgreSQL/SQLite {result['throughput']['ratio_postgresql_over_sqlite']} -> {path}"
    )


if __name__ == "__main__":
    main()
