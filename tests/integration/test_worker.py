"""The training worker end to end on a tiny pre-trained ViT: ordering, cards, the gate, crashes, leases."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fmlora.data import make_synthetic_stream
from fmlora.data.archive import write_task_archive
from fmlora.data.images import FileImageSet
from fmlora.model import BackboneConfig, FMLoRAModel
from fmlora.model.snapshot import load_snapshot, read_snapshot
from fmlora.registry.artifacts import read_task_files
from fmlora.registry.intake import submit_task
from fmlora.registry.registry import Registry
from fmlora.registry.store import S3Store
from fmlora.training import TrainConfig, evaluate
from fmlora.worker.state import unpack_state
from fmlora.worker.worker import GateConfig, Worker, WorkerConfig
from tests.conftest import tiny_config
from tests.integration.registry.services import MotoS3, registry_url, s3_bucket  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[2]
FAST = TrainConfig(epochs=2, batch_size=8, lr=3e-3, progress_bar=False)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def submit_stream(registry: Registry, tmp_path: Path, num_tasks: int, seed: int = 0) -> list[str]:
    stream = make_synthetic_stream(
        num_tasks=num_tasks, classes_per_task=3, train_per_class=8, test_per_class=2, seed=seed
    )
    ids = []
    for task in stream:
        from fmlora.data.images import ConcatImages

        archive = write_task_archive(ConcatImages((task.train, task.test)), tmp_path / f"{task.name}.zip")
        ids.append(submit_task(registry, archive, name=task.name, kind="class").id)
    return ids


@pytest.fixture
def home(tmp_path: Path, pretrained_tiny: BackboneConfig, registry_url: str | None) -> Registry:  # noqa: F811
    return Registry.open(tmp_path / "home", tiny_config(pretrained_tiny), registry_url=registry_url)


def worker_env(registry: Registry, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "FMLORA_REGISTRY_URL": registry.registry_url or "", **extra}


def test_three_tasks_publish_three_versions_in_order(home: Registry, tmp_path: Path) -> None:
    ids = submit_stream(home, tmp_path, 3)
    seen: list[tuple[str, dict]] = []
    worker = Worker(home, WorkerConfig(train=FAST, progress_interval_s=0.0), on_stage=lambda s, i: seen.append((s, i)))
    worker.run_forever(exit_when_idle=True)

    versions = home.list_versions()
    assert [v.version for v in versions] == [1, 2, 3]
    assert [v.state for v in versions] == ["retired", "retired", "live"]
    assert [v.parent for v in versions] == [None, 1, 2]
    assert home.live_version() == 3
    assert versions[0].card["train"]["epochs"] == FAST.epochs  # the first task always adapts
    for v, task_id in zip(versions, ids, strict=True):
        task = home.get_task(task_id)
        assert task.status == "live" and task.version == v.version
        card = v.card
        if card["train"]["epochs"]:  # the first task, and any later one novel enough to adapt
            assert task.progress["step"] == task.progress["steps"] > 0
        else:  # a familiar later task only adds class statistics: nothing to report step by step
            assert v.version > 1 and card["train"]["steps"] == 0 and "step" not in task.progress
        assert len(card["accuracy_matrix"]) == v.version  # one row per task learned so far
        assert card["accuracy_matrix"][-1] == list(card["accuracy"].values())
        assert card["tasks"] == v.tasks == [f"task{i}" for i in range(v.version)]
        assert 0.0 <= card["final_accuracy"] <= 1.0 and card["gate"]["passed"]
    # Earlier rows are carried, not recomputed: version 3's first rows equal version 2's matrix.
    assert versions[2].card["accuracy_matrix"][:2] == versions[1].card["accuracy_matrix"]
    # The card's accuracies are real: the snapshot classifies its held-out data that well.
    assert versions[2].card["accuracy"]["task0"] > 0.5
    assert [s for s, _ in seen if s != "progress"].count("published") == 3
    # What was published is exactly what a server loads.
    model = FMLoRAModel(home.model_config)
    manifest = load_snapshot(model, home.fetch_version(3))
    assert manifest.card == versions[2].card and model.labels[:3] == ["t0c0", "t0c1", "t0c2"]
    assert read_snapshot(home.fetch_version(3)).manifest.tensors_sha256 == versions[2].sha256
    assert home.lease("worker") is None  # released on exit


def test_impossible_gate_rejects_and_live_stays(home: Registry, tmp_path: Path) -> None:
    submit_stream(home, tmp_path, 2)
    with Worker(home, WorkerConfig(train=FAST)) as first:
        first.run_once()
        assert home.live_version() == 1
        # Holding the lease, the first worker keeps any other from training.
        assert Worker(home, WorkerConfig(train=FAST)).run_once() is None
    strict = WorkerConfig(train=FAST, gate=GateConfig(min_new_task_accuracy=1.01, max_forgetting=-1.0))
    with Worker(home, strict) as second:
        task = second.run_once()
    assert task is not None and task.status == "rejected"
    assert "below the minimum" in task.error
    assert home.live_version() == 1
    rejected = home.get_version(2)
    assert rejected.state == "rejected" and not rejected.card["gate"]["passed"]
    assert any("dropped" in r for r in rejected.card["gate"]["reasons"])
    assert home.snapshot_dir(2).is_dir()  # kept with its card for inspection


def test_rollback_then_next_task_trains_from_the_live_version(home: Registry, tmp_path: Path) -> None:
    submit_stream(home, tmp_path, 2)
    worker = Worker(home, WorkerConfig(train=FAST, keep_versions=5))
    worker.run_forever(exit_when_idle=True)
    home.activate(1)
    stream = make_synthetic_stream(num_tasks=3, classes_per_task=3, train_per_class=8, test_per_class=2, seed=0)
    submit_task(home, write_task_archive(stream[2].train, tmp_path / "t2.zip"), name="task2", kind="class")
    worker.run_forever(exit_when_idle=True)
    v3 = home.get_version(3)
    assert v3.parent == 1 and v3.tasks == ["task0", "task2"] and home.live_version() == 3


def _eval_images(registry: Registry, task_id: str, model: FMLoRAModel) -> FileImageSet:
    stored = read_task_files(registry, task_id)
    position = {c: i for i, c in enumerate(stored.classes)}
    labels = torch.tensor([position[c] for _, c in stored.eval], dtype=torch.long)
    paths = tuple(path for path, _ in stored.eval)
    return FileImageSet(
        paths, labels, tuple(stored.classes), model.preprocessor.input_size, model.preprocessor.crop_pct
    )


def _served_and_solved(registry: Registry, version: int, *, with_held_out: bool) -> tuple[FMLoRAModel, torch.Tensor]:
    """The version's snapshot as a server loads it, and the head rows solved from its worker state
    (the training statistics, plus the held-out ones when asked), rounded as the head stores them."""
    model = FMLoRAModel(registry.model_config)
    load_snapshot(model, registry.fetch_version(version))
    classes = unpack_state(registry.read_worker_state(version), model)
    assert classes.ridge is not None and classes.held_out is not None
    stats = classes.ridge.merged(classes.held_out) if with_held_out else classes.ridge
    weight = stats.solve(registry.get_version(version).card["train"]["relative_lambda"])
    rows = weight.T[[stats.labels.index(label) for label in model.head.labels]]
    return model, rows.to(model.head.frozen_weight.dtype)


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the head's float16 rounding (relative to the rows' scale)."""
    return float((a.float() - b.float()).abs().max()) <= 2e-3 * float(b.float().abs().max())


def test_held_out_images_join_the_served_head_but_never_a_gate(home: Registry, tmp_path: Path) -> None:
    ids = submit_stream(home, tmp_path, 2)
    Worker(home, WorkerConfig(train=FAST)).run_forever(exit_when_idle=True)
    eval_sizes = []
    for version in (1, 2):
        card = home.get_version(version).card
        eval_sizes.append(card["eval_sizes"][-1])
        assert card["gate"]["passed"]
        model, rows = _served_and_solved(home, version, with_held_out=True)
        # The served rows are the head of the training and the held-out images together ...
        assert _same_rows(model.head.frozen_weight, rows)
        classes = unpack_state(home.read_worker_state(version), model)
        assert classes.held_out is not None and classes.ridge is not None
        assert card["served_head"]["held_out_images"] == int(classes.held_out.counts.sum()) == sum(eval_sizes)
        assert card["served_head"]["training_images"] == int(classes.ridge.counts.sum())
        # ... while the card's accuracy is the gated head's, solved without them: scored honestly.
        _, gated = _served_and_solved(home, version, with_held_out=False)
        assert not _same_rows(gated, rows)
        model.head.set_rows(gated.float())
        for name, tid in zip(card["tasks"], ids, strict=False):
            assert evaluate(model, _eval_images(home, tid, model)) == pytest.approx(card["accuracy"][name])


def test_with_fold_in_off_the_served_head_is_the_gated_one(home: Registry, tmp_path: Path) -> None:
    submit_stream(home, tmp_path, 2)
    Worker(home, WorkerConfig(train=FAST, fold_in_held_out=False)).run_forever(exit_when_idle=True)
    for version in (1, 2):
        assert "served_head" not in home.get_version(version).card
        assert "held_out.counts" not in home.read_worker_state(version).tensors
        model, rows = _served_and_solved(home, version, with_held_out=False)
        assert _same_rows(model.head.frozen_weight, rows)


def run_worker(registry: Registry, kill_at: str = "", timeout: float = 240) -> subprocess.CompletedProcess:
    env = worker_env(registry, LEASE_TTL="1.5")
    return subprocess.run(
        [sys.executable, "-m", "tests.integration.worker_proc", str(registry.home), kill_at],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def visible_snapshots(registry: Registry) -> list[str]:
    return sorted({o.key.split("/")[1] for o in registry.store.list("snapshots")})


def staging(registry: Registry) -> list[Path]:
    return [*registry.scratch_dir.glob(".*"), *registry.snapshots_dir.glob(".*")]


@pytest.mark.parametrize("kill_at", ["progress", "publishing", "written"])
def test_sigkill_leaves_nothing_partial_and_the_task_is_retried(home: Registry, tmp_path: Path, kill_at: str) -> None:
    [task_id] = submit_stream(home, tmp_path, 1)
    killed = run_worker(home, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # Whatever the moment, no reader can see a snapshot that is not recorded and complete.
    assert home.list_versions() == [] and home.live_version() is None
    if kill_at == "publishing":
        assert staging(home)  # died mid-write: only hidden local staging, never a stored object
    for name in visible_snapshots(home):
        assert kill_at == "written" and name == "v1"  # stored but never recorded: removed on recovery
    assert home.get_task(task_id).status == ("training" if kill_at == "progress" else "evaluating")

    time.sleep(1.6)  # the dead worker's lease runs out
    restarted = run_worker(home)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    task = home.get_task(task_id)
    assert task.status == "live" and task.attempts == 2
    # A number handed to the dead worker is never reused: versions stay strictly increasing.
    assert task.version == (1 if kill_at == "progress" else 2)
    assert visible_snapshots(home) == [f"v{task.version}"] and home.live_version() == task.version
    assert staging(home) == []
    read_snapshot(home.fetch_version(task.version))  # complete and verified
    assert [e.kind for e in home.events()].count("requeued") == 1


def test_two_workers_at_once_exactly_one_trains(home: Registry, tmp_path: Path) -> None:
    submit_stream(home, tmp_path, 2)
    env = worker_env(home, LEASE_TTL="5")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.integration.worker_proc", str(home.home)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    claims = [e for e in home.events() if e.kind == "claimed"]
    assert len(claims) == 2 and len({e.detail["owner"] for e in claims}) == 1
    trained = [o[0].count("STAGE training") for o in outputs]
    assert sorted(trained) == [0, 2]
    assert [v.version for v in home.list_versions()] == [1, 2]


def test_sigterm_abandons_cleanly_and_requeues(home: Registry, tmp_path: Path) -> None:
    [task_id] = submit_stream(home, tmp_path, 1)
    env = worker_env(home)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.worker_proc", str(home.home)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("STAGE progress"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    task = home.get_task(task_id)
    assert task.status == "queued" and "stopped" in task.error
    assert home.lease("worker") is None and visible_snapshots(home) == []
    torch.manual_seed(0)


def test_store_unreachable_while_publishing_fails_cleanly_and_the_task_is_retried(
    tmp_path: Path,
    pretrained_tiny: BackboneConfig,
    registry_url: str | None,  # noqa: F811
    s3_bucket: tuple[MotoS3, str],  # noqa: F811
) -> None:
    server, bucket = s3_bucket
    registry = Registry.open(
        tmp_path / "s3home",
        tiny_config(pretrained_tiny),
        registry_url=registry_url,
        store_url=f"s3://{bucket}/fmlora",
        s3=server.options(),
    )
    [task_id] = submit_stream(registry, tmp_path, 1)
    assert registry.get_task(task_id).archive_sha256 is not None  # the upload went to the bucket
    reachable = registry.store
    unreachable = S3Store(bucket, "fmlora", server.options(endpoint_url=f"http://127.0.0.1:{free_port()}"))

    def cut_the_store(stage: str, info: dict) -> None:
        if stage == "evaluating":  # trained; the publish comes next
            registry.store = unreachable

    with Worker(registry, WorkerConfig(train=FAST), on_stage=cut_the_store) as worker:
        task = worker.run_once()
        assert task is not None and task.status == "queued" and "interrupted" in task.error
        assert registry.list_versions() == [] and registry.live_version() is None
        assert [o.key for o in reachable.list("snapshots")] == []
        registry.store = reachable
        worker._on_stage = None
        task = worker.run_once()
    assert task is not None and task.status == "live" and task.attempts == 2
    assert [v.version for v in registry.list_versions()] == [task.version]
    assert [e.kind for e in registry.events()].count("published") == 1


def test_database_outage_mid_task_the_worker_resumes_and_the_task_completes_once(
    tmp_path: Path, pretrained_tiny: BackboneConfig
) -> None:
    """PostgreSQL goes away mid-training for longer than a request waits: the worker keeps retrying, takes the lease
    anew once it is back (recovery requeues the task) and the task is published exactly once."""
    import threading

    from tests.integration.registry.services import postgres_cluster

    cluster = postgres_cluster()
    name = cluster.create_database()
    outage: list[threading.Thread] = []
    try:
        registry = Registry.open(tmp_path / "home", tiny_config(pretrained_tiny), registry_url=cluster.url(name))
        [task_id] = submit_stream(registry, tmp_path, 1)

        def cut_the_database(stage: str, info: dict) -> None:
            if stage == "progress" and info["step"] == 2 and not outage:
                cluster.pause()
                outage.append(threading.Thread(target=lambda: (time.sleep(8), cluster.start())))
                outage[0].start()

        config = WorkerConfig(train=FAST, progress_interval_s=0.0, poll_interval_s=0.2, lease_ttl_s=60)
        Worker(registry, config, on_stage=cut_the_database).run_forever(exit_when_idle=True)
        outage[0].join()
        task = registry.get_task(task_id)
        assert task.status == "live" and task.attempts == 2
        kinds = [e.kind for e in registry.events()]
        assert kinds.count("published") == 1 and kinds.count("requeued") == 1
        assert [v.version for v in registry.list_versions()] == [task.version]
    finally:
        for thread in outage:
            thread.join()
        cluster.drop_database(name)


def test_stop_is_safe_in_a_signal_handler_that_interrupts_a_wait(home: Registry) -> None:
    import threading

    worker = Worker(home, WorkerConfig(train=FAST))
    # A handler runs in the main thread between bytecodes, possibly while that thread holds the
    # stop Event's lock inside its wait: stop() must take no lock there (it deadlocked once).
    with worker._stop._cond:
        previous = signal.signal(signal.SIGUSR1, lambda *_: worker.stop())
        try:
            done = threading.Event()
            timer = threading.Timer(5.0, lambda: done.is_set() or os.kill(os.getpid(), signal.SIGTERM))
            timer.daemon = True
            timer.start()
            signal.raise_signal(signal.SIGUSR1)
            done.set()
        finally:
            signal.signal(signal.SIGUSR1, previous)
    assert worker._stop_requested and not worker._stop.is_set()
    worker.run_forever()  # returns at once: the flag is checked before any work
    # From another thread, the Event is set too, so waits end at once.
    other = Worker(home, WorkerConfig(train=FAST))
    thread = threading.Thread(target=other.stop)
    thread.start()
    thread.join(5)
    assert other._stop.is_set() and other._stop_requested
