"""Worker standby under repeated SIGKILLs: ``python -m benchmarks.standby --out DIR [--kills 20] [--tasks N]
[--registry sqlite|postgresql]``.

A home on the tiny random ViT (a weight file, so every process builds the same backbone) gets a queue of
small tasks (``--tasks``, topped up to three queued until the last kill, so it never drains first); two
``fmlora worker --exit-when-idle`` processes start (one trains, one waits for the lease).
Then, until ``--kills`` kills are made: wait for a live worker to hold the lease, wait a random 0.5-4 s,
SIGKILL the lease holder (its pid is in its worker id) and start a replacement. A holder whose task is on
its last attempt is spared and another point drawn: a third death fails a task by design (``MAX_ATTEMPTS``,
the poison-task guard), which would say nothing about standby. The survivors then drain
the queue and exit. The checks, read from the registry afterwards: no task lost (submitted = live +
rejected + failed, nothing still queued or mid-training), one version per task, version numbers strictly
increasing, and no snapshot in the store without a version row or with objects missing. Exit status 1
when a check fails.

The workers are the real ``fmlora worker`` command with a shorter lease (``--lease-ttl``, default 3 s;
the command's own is 30 s, which would make 20 takeovers take over ten minutes): the benchmark starts
them as ``python -m benchmarks.standby worker --lease-ttl S -- <fmlora worker options>``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from benchmarks import REPO
from benchmarks.report import write_json

__all__ = ["check", "run"]

# Tasks kept queued until the last kill, so a worker never idles out before it (``--exit-when-idle``).
QUEUE_DEPTH = 3
WORKER_OPTIONS = ("--epochs", "1", "--batch-size", "8", "--device", "cpu", "--exit-when-idle")


def worker_main(argv: list[str]) -> None:
    """``fmlora worker`` with the lease's timings shortened (the command has no option for them)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.standby worker")
    parser.add_argument("--lease-ttl", type=float, default=3.0)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    import fmlora.worker
    from fmlora.cli import app

    fmlora.worker.WorkerConfig = functools.partial(  # type: ignore[misc]
        fmlora.worker.WorkerConfig,
        lease_ttl_s=args.lease_ttl,
        heartbeat_s=args.lease_ttl / 6,
        poll_interval_s=0.2,
        progress_interval_s=0.2,
    )
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    app(["worker", *rest])


class Workers:
    """The worker processes of one run, by pid; each logs to its own file under ``logs``."""

    def __init__(self, home: Path, logs: Path, lease_ttl: float, registry_url: str | None) -> None:
        self.home, self.logs, self.lease_ttl = home, logs, lease_ttl
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
            "FMLORA_REGISTRY_URL": registry_url or "",
        }
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self) -> int:
        log = (self.logs / f"worker-{len(self._files):02d}.log").open("wb")
        self._files.append(log)
        command = [sys.executable, "-m", "benchmarks.standby", "worker", "--lease-ttl", str(self.lease_ttl), "--"]
        command += ["--home", str(self.home), *WORKER_OPTIONS]
        proc = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[proc.pid] = proc
        return proc.pid

    def alive(self) -> list[int]:
        return [pid for pid, p in self.procs.items() if p.poll() is None]

    def close(self) -> dict[int, int | None]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for f in self._files:
            f.close()
        return {pid: p.returncode for pid, p in self.procs.items()}


def holder_pid(registry: Any) -> int | None:
    """The pid in the current lease owner's id (``host-pid-random``), or None when nobody holds it."""
    from fmlora.registry import WORKER_LEASE

    lease = registry.lease(WORKER_LEASE)
    if lease is None or lease.expires < time.time():
        return None
    try:
        return int(lease.owner.rsplit("-", 2)[1])
    except (IndexError, ValueError):
        return None


class TaskFeed:
    """The run's tasks, made as they are needed (a chunk of archives at a time) and submitted in order.

    A tiny task trains in a fraction of a second on a fast machine, so any fixed queue can drain before
    the kills land; the run keeps a few tasks queued until the last kill instead."""

    CHUNK = 16

    def __init__(self, registry: Any, work: Path, seed: int) -> None:
        self.registry, self.archives, self.seed = registry, work / "archives", seed
        self.archives.mkdir(parents=True, exist_ok=True)
        self.made = 0
        self.pending: list[tuple[str, Path]] = []
        self.ids: list[str] = []

    def _make_chunk(self) -> None:
        from fmlora.data.archive import write_task_archive
        from fmlora.data.images import ConcatImages, ImageSet
        from fmlora.data.synthetic import make_synthetic_stream

        chunk = make_synthetic_stream(
            num_tasks=self.CHUNK, classes_per_task=2, train_per_class=8, test_per_class=2, seed=self.seed + self.made
        )
        for task in chunk:
            # Every chunk's stream counts from task0/t0c0: renumber so names and classes stay unique.
            number = self.made
            self.made += 1
            renamed = [
                ImageSet(split.images, split.labels, tuple(f"t{number}c{i}" for i in range(len(split.classes))))
                for split in (task.train, task.test)
            ]
            name = f"task{number}"
            self.pending.append((name, write_task_archive(ConcatImages(renamed), self.archives / f"{name}.zip")))

    def submit(self, count: int) -> None:
        from fmlora.registry.intake import submit_task

        for _ in range(count):
            if not self.pending:
                self._make_chunk()
            name, archive = self.pending.pop(0)
            self.ids.append(submit_task(self.registry, archive, name=name, kind="class").id)

    def top_up(self, depth: int) -> None:
        """Submit until ``depth`` tasks are queued."""
        queued = len(self.registry.list_tasks(status="queued"))
        if queued < depth:
            self.submit(depth - queued)

    def keep_queued(self, depth: int, seconds: float) -> None:
        """Wait ``seconds``, topping up as the worker drains the queue (a tiny task trains in a fraction of
        a second, so the queue can empty within one wait)."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            self.top_up(depth)
            time.sleep(min(0.05, left))


def check(registry: Any, ids: list[str]) -> dict[str, Any]:
    """The figures and checks of a finished run, from the registry's own rows and store listing."""
    from fmlora.registry.records import SNAPSHOT_OBJECTS

    tasks = [registry.get_task(i) for i in ids]
    by_status = {s: sum(t.status == s for t in tasks) for s in ("live", "rejected", "failed", "queued")}
    unfinished = sum(t.status in ("training", "evaluating") for t in tasks)
    lost = len(ids) - by_status["live"] - by_status["rejected"] - by_status["failed"]
    versions = registry.list_versions()
    numbers = [v.version for v in versions]
    per_task: dict[str | None, int] = {}
    for v in versions:
        per_task[v.task_id] = per_task.get(v.task_id, 0) + 1
    duplicates = sorted(str(t) for t, n in per_task.items() if n > 1)
    published = [e.task_id for e in registry.events() if e.kind == "published"]
    stored: dict[str, set[str]] = {}
    for obj in registry.store.list("snapshots"):
        parts = obj.key.split("/")
        if len(parts) >= 3:
            stored.setdefault(parts[1], set()).add("/".join(parts[2:]))
    recorded = {f"v{n}" for n in numbers}
    partial = sorted(
        name for name, objects in stored.items() if name not in recorded or not set(SNAPSHOT_OBJECTS) <= objects
    )
    missing = sorted(recorded - set(stored))
    finished_tasks = {t.id for t in tasks if t.status in ("live", "rejected")}
    figures = {
        "tasks": {
            "submitted": len(ids),
            **by_status,
            "mid_training": unfinished,
            "lost": lost,
            "attempts": {str(n): sum(t.attempts == n for t in tasks) for n in sorted({t.attempts for t in tasks})},
            "failed_errors": sorted({t.error or "" for t in tasks if t.status == "failed"}),
        },
        "versions": {
            "count": len(numbers),
            "numbers": numbers,
            "strictly_increasing": all(a < b for a, b in itertools.pairwise(numbers)),
            "duplicates": duplicates,
            "published_events": len(published),
            "published_events_duplicated": len(published) - len(set(published)),
            "partial_snapshots": partial,
            "recorded_without_objects": missing,
        },
    }
    figures["checks"] = {
        "no_lost_tasks": lost == 0 and unfinished == 0 and by_status["queued"] == 0,
        "no_duplicate_versions": not duplicates and len(published) == len(set(published)),
        "versions_strictly_increasing": figures["versions"]["strictly_increasing"],
        "one_version_per_finished_task": set(per_task) == finished_tasks and len(numbers) == len(finished_tasks),
        "no_partial_snapshots": not partial and not missing,
    }
    return figures


def run(
    kills: int = 20,
    tasks: int | None = None,
    backend: str = "sqlite",
    lease_ttl: float = 3.0,
    seed: int = 0,
    timeout_s: float = 900.0,
    registry_url: str | None = None,
) -> dict[str, Any]:
    """One run; ``registry_url`` (a PostgreSQL database that exists) replaces the throwaway cluster."""
    from fmlora.registry.records import MAX_ATTEMPTS
    from fmlora.registry.registry import Registry
    from tests.e2e._homes import tiny_file_config

    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="fmlora-standby-"))
    cluster = database = None
    if registry_url is not None:
        backend = "postgresql"
    elif backend == "postgresql":
        from tests.integration.registry.services import PostgresCluster

        cluster = PostgresCluster()
        database = cluster.create_database()
        registry_url = cluster.url(database)
    tasks = tasks if tasks is not None else kills + 10
    started = time.monotonic()
    registry = Registry.open(work / "home", tiny_file_config(work / "backbone"), registry_url=registry_url)
    feed = TaskFeed(registry, work, seed)
    feed.submit(tasks)
    workers = Workers(work / "home", work / "logs", lease_ttl, registry_url)
    events: list[dict[str, Any]] = []
    ran_out = False
    spared = 0
    try:
        workers.start()
        workers.start()
        t0 = time.monotonic()
        while len(events) < kills:
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"{len(events)} of {kills} kills after {timeout_s} s")
            feed.top_up(QUEUE_DEPTH)
            alive = workers.alive()
            if not alive:
                ran_out = True  # every worker exited before enough kills (a crash: the queue is kept full)
                break
            pid = holder_pid(registry)
            if pid not in alive:
                time.sleep(0.05)
                continue
            feed.keep_queued(QUEUE_DEPTH, rng.uniform(0.5, 4.0))
            pid = holder_pid(registry)
            if pid not in workers.alive():
                continue
            active = [t for s in ("training", "evaluating") for t in registry.list_tasks(status=s)]
            if active and active[0].attempts >= MAX_ATTEMPTS:
                # A third death would fail the task by design (the poison-task guard): let this attempt
                # finish and draw another point, so the kills land across the stream.
                spared += 1
                continue
            os.kill(pid, signal.SIGKILL)
            workers.procs[pid].wait()
            events.append(
                {
                    "at_s": round(time.monotonic() - t0, 2),
                    "pid": pid,
                    "task": active[0].name if active else None,
                    "stage": active[0].status if active else "between tasks",
                    "step": active[0].progress.get("step") if active else None,
                }
            )
            workers.start()
            print(f"kill {len(events)}/{kills}: pid {pid} ({events[-1]['stage']})", file=sys.stderr, flush=True)
        while workers.alive():
            if time.monotonic() - started > timeout_s:
                raise TimeoutError("the workers did not drain the queue in time")
            time.sleep(0.2)
        seconds = time.monotonic() - t0
    finally:
        exits = workers.close()
    figures = check(registry, feed.ids)
    killed = {e["pid"] for e in events}
    figures["checks"]["kills_made"] = len(events) == kills
    figures["checks"]["survivors_exited_cleanly"] = all(rc == 0 for pid, rc in exits.items() if pid not in killed)
    stages: dict[str, int] = {}
    for e in events:
        stages[e["stage"]] = stages.get(e["stage"], 0) + 1
    result = {
        "benchmark": "worker standby under SIGKILL",
        "registry": backend,
        "lease_ttl_s": lease_ttl,
        "worker_options": list(WORKER_OPTIONS),
        "kills_requested": kills,
        "kills_made": len(events),
        "kills_by_stage": stages,
        "kills_spared_on_last_attempt": spared,
        "ran_out_of_tasks": ran_out,
        "workers_started": len(exits),
        "seconds": round(seconds, 1),
        **figures,
        "passed": all(figures["checks"].values()),
        "kills": events,
    }
    if cluster is not None and database is not None:
        cluster.drop_database(database)
        cluster.stop()
    if result["passed"]:
        shutil.rmtree(work, ignore_errors=True)
    else:
        result["kept_for_inspection"] = str(work)  # the home and the workers' logs
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        worker_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.standby", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument(
        "--tasks",
        type=int,
        default=None,
        help="tasks queued at the start (default: kills + 10); topped up to 3 queued until the last kill",
    )
    parser.add_argument("--registry", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--lease-ttl", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run(args.kills, args.tasks, args.registry, args.lease_ttl, args.seed)
    path = write_json(args.out / f"standby-{args.registry}.json", result)
    print(json.dumps({k: result[k] for k in ("kills_made", "seconds", "tasks", "checks", "passed")}, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
