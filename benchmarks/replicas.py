"""Replicas converging on a version: N ``fmlora serve --no-worker`` processes on one PostgreSQL and one
S3 endpoint (moto's server on 127.0.0.1), a load generator spread over them, publishes and rollbacks.

    python -m benchmarks.replicas                      # short: 30 publishes, 6 rollbacks
    python -m benchmarks.replicas --publishes 100 --rollbacks 20

Measures, per publish or rollback, the time from the registry commit to every replica serving it
(p50/p99 over events): ``convergence`` until the last replica's GET /readyz says the version (each
replica polled every 5 ms on a connection of its own), and ``convergence_swapped`` until the last
replica's own record of its swap (``fmlora_serving_since_timestamp_seconds``), which leaves out how
late a poll notices. The commit's time is when this process heard the NOTIFY that the commit sent,
or when the publisher's call returned, whichever came first. Also: failed requests during the run;
"regressions": a response from a version that the same replica had already replaced (every answer's
version is placed in the sequence of live versions by the time its publish or rollback *started*,
the earliest it could be served, so a replica that swaps before the publisher's call returns is not
mistaken for one going back; the place must never go back on one replica); the mean time per swap
stage over the replicas (their /metrics); and the throughput of one replica on PostgreSQL against one
on SQLite serving the same snapshot (ratio in one run: the registry is not on the predict path).

moto's S3 server and the load clients run in processes of their own (``benchmarks.convergence``
says why). Writes JSON.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.convergence import CommitClock, LoadProcess, MotoProcess, Pollers, serving_since, stage_means
from benchmarks.loadgen import encode_image, http_load, predict_body, random_images
from benchmarks.models import model_config
from benchmarks.processes import ServerProcess
from benchmarks.publish import Publisher
from benchmarks.report import ratio, summarize, write_json
from fmlora.registry.publish import publish_version
from fmlora.registry.registry import Registry

__all__ = ["main", "run"]

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def _rate(answers: list[tuple[int, float, int, int | None]]) -> float | None:
    """Answers per second while the load ran (the load level, which a shorter run does not change)."""
    if len(answers) < 2:
        return None
    times = [a[1] for a in answers]
    return round((len(answers) - 1) / (max(times) - min(times)), 1)


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
    from tests.integration.registry.services import PostgresCluster

    work = work or Path(tempfile.mkdtemp(prefix="fmlora-replicas-"))
    cluster = PostgresCluster()
    s3 = MotoProcess()
    servers: list[ServerProcess] = []
    pollers: Pollers | None = None
    commits: CommitClock | None = None
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
        pollers, commits = Pollers(urls), CommitClock(registry)
        with LoadProcess(urls, body) as load:
            time.sleep(0.5)
            for kind in kinds:
                live = timeline[-1][1]
                earlier = [v for v in publisher.good_versions if v != live]
                started = time.monotonic()
                if kind == "rollback" and earlier:
                    done = publisher.rollback(rng.choice(earlier[-5:]))
                else:
                    kind = "publish"
                    done = publisher.publish(new_task=rng.random() < 0.2)
                timeline.append((started, done.version))
                events.append(_event(kind, done, started, urls, pollers, commits))
            time.sleep(0.5)
        answers = load.answers
        converged = [e["converged_s"] for e in events if e["converged_s"] is not None]
        swapped = [e["swapped_s"] for e in events if e["swapped_s"] is not None]
        failed = sum(1 for a in answers if a[2] != 200)
        stages = stage_means(urls)

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
                "store": "s3 (moto's server in a process of its own, 127.0.0.1)",
                "load": "one client per replica, back to back, in a process of its own",
                "poll_interval_s": poll_interval_s,
                "publishes": sum(1 for e in events if e["kind"] == "publish"),
                "rollbacks": sum(1 for e in events if e["kind"] == "rollback"),
            },
            "convergence": {**summarize(converged), "not_converged": len(events) - len(converged)},
            "convergence_swapped": {**summarize(swapped), "unknown": len(events) - len(swapped)},
            "commit_heard_before_return_ms": summarize([e["heard_before_return_s"] for e in events])["p50_ms"],
            "swap_stages": stages,
            "requests": {"total": len(answers), "failed": failed, "per_s": _rate(answers)},
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
        if pollers is not None:
            pollers.close()
        if commits is not None:
            commits.stop()
        s3.stop()
        cluster.stop()


def _event(
    kind: str,
    done: Any,
    started: float,
    urls: list[str],
    pollers: Pollers,
    commits: CommitClock,
) -> dict[str, Any]:
    """One publish or rollback: when it committed, when each replica was seen serving it and when each
    swapped to it (seconds after the commit)."""
    seen = pollers.first_seen(done.version, timeout_s=30.0)
    heard = commits.heard(done.version, started)
    committed = done.committed_at if heard is None else min(heard, done.committed_at)
    swaps = [serving_since(url, done.version) for url in urls]
    wall_offset = time.time() - time.monotonic()  # now, not at the start: the wall clock may be slewed
    polled = None if None in seen else max(s for s in seen if s is not None) - committed
    stamped = None if None in swaps else max(s for s in swaps if s is not None) - wall_offset - committed
    return {
        "kind": kind,
        "version": done.version,
        "converged_s": polled,
        "swapped_s": stamped,
        "seen_s": [None if s is None else round(s - committed, 4) for s in seen],
        "swapped_at_s": [None if s is None else round(s - wall_offset - committed, 4) for s in swaps],
        "heard_before_return_s": done.committed_at - committed,
    }


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
        f"swapped p50 {result['convergence_swapped']['p50_ms']} ms, p99 {result['convergence_swapped']['p99_ms']} ms; "
        f"requests {req['total']}, failed {req['failed']}; regressions {result['regressions']}; "
        f"throughput PostgreSQL/SQLite {result['throughput']['ratio_postgresql_over_sqlite']} -> {path}"
    )


if __name__ == "__main__":
    main()
