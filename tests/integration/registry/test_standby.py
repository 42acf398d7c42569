"""Worker standby and parent death, on both backends, with real processes.

- Two workers: one holds the lease and trains, the other waits. SIGKILL the active one mid-task: the
  standby takes over once the lease expires, every task completes exactly once, versions stay
  strictly increasing and no partial snapshot becomes visible.
- The embedded worker ends with its server: SIGKILL the parent (a stand-in for ``fmlora serve``) and
  the worker is gone within seconds, its task back in the queue and its lease released; a new worker
  takes the lease and the interrupted task finishes exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fmlora.model import BackboneConfig
from fmlora.registry import WORKER_LEASE, Registry
from fmlora.worker.parent import parent_alive, watch_parent
from tests.conftest import tiny_config
from tests.integration.registry.services import registry_url  # noqa: F401 - fixture
from tests.integration.test_worker import submit_stream, visible_snapshots

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def home(tmp_path: Path, pretrained_tiny: BackboneConfig, registry_url: str | None) -> Registry:  # noqa: F811
    return Registry.open(tmp_path / "home", tiny_config(pretrained_tiny), registry_url=registry_url)


def env_for(registry: Registry, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "FMLORA_REGISTRY_URL": registry.registry_url or "", **extra}


def start_worker(registry: Registry, lease_ttl: str, epochs: int = 2) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.worker_proc", str(registry.home)],
        cwd=ROOT,
        env=env_for(registry, LEASE_TTL=lease_ttl, EPOCHS=str(epochs)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(condition, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def process_gone(pid: int) -> bool:
    return not parent_alive(pid, direct=False)


def test_standby_takes_over_from_a_killed_worker(home: Registry, tmp_path: Path) -> None:
    ids = submit_stream(home, tmp_path, 2)
    active = start_worker(home, lease_ttl="2", epochs=100)  # still on its first task when killed
    assert active.stdout is not None
    for line in active.stdout:  # training the first task, mid-epoch
        if line.startswith("STAGE progress") and "'step': 2" in line:
            break
    standby = start_worker(home, lease_ttl="2")
    time.sleep(1.0)
    assert home.lease(WORKER_LEASE) is not None and standby.poll() is None  # waiting, not training
    active.send_signal(signal.SIGKILL)
    active.wait(10)
    out, _ = standby.communicate(timeout=300)
    assert standby.returncode == 0, out[-3000:]
    assert out.count("STAGE training") == 2  # the interrupted task and the next one

    tasks = [home.get_task(i) for i in ids]
    assert [t.status for t in tasks] == ["live", "live"]
    versions = [v.version for v in home.list_versions()]
    assert versions == sorted(set(versions)) and [t.version for t in tasks] == versions  # once each, increasing
    events = home.events()
    assert [e.task_id for e in events if e.kind == "published"] == ids  # each task published exactly once
    owners = [e.detail["owner"] for e in events if e.kind == "lease_acquired"]
    assert len(owners) == 2 and owners[0] != owners[1]
    assert [e.task_id for e in events if e.kind == "requeued"] == [ids[0]]
    assert visible_snapshots(home) == [f"v{v}" for v in versions]  # nothing partial or unrecorded


def test_the_worker_ends_with_its_parent_and_the_task_finishes_once(home: Registry, tmp_path: Path) -> None:
    [task_id] = submit_stream(home, tmp_path, 1)
    parent = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.registry.parent_proc", str(home.home), "--epochs", "1000"],
        cwd=ROOT,
        env=env_for(home),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        worker_pid = int(parent.stdout.readline().split()[1])

        # Mid-training, not after it: progress is written once a second, and the last step always, so
        # a run shorter than that shows step >= 2 only when it is over (then the kill lands in the
        # head's solve or the publish, and the task is rightly published). 1,000 epochs of the tiny
        # task take several seconds.
        def mid_training() -> bool:
            progress = home.get_task(task_id).progress
            return 2 <= progress.get("step", 0) < progress.get("steps", 0)

        wait_for(mid_training, 120, "the worker to be mid-training")
        holder = home.lease(WORKER_LEASE)
        assert holder is not None
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        seconds = wait_for(lambda: process_gone(worker_pid), 15, "the orphaned worker to exit")
    finally:
        if parent.poll() is None:
            parent.kill()
        if not process_gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
    print(f"worker gone {seconds:.2f} s after its parent was SIGKILLed")
    task = home.get_task(task_id)
    assert task.status == "queued" and "stopped" in task.error  # put back, not left mid-training
    assert home.lease(WORKER_LEASE) is None  # released: the next worker need not wait for expiry

    successor = start_worker(home, lease_ttl="5")
    out, _ = successor.communicate(timeout=300)
    assert successor.returncode == 0, out[-3000:]
    task = home.get_task(task_id)
    assert task.status == "live" and task.attempts == 2
    events = home.events()
    assert [e.task_id for e in events if e.kind == "published"] == [task_id]
    owners = [e.detail["owner"] for e in events if e.kind == "lease_acquired"]
    assert owners[0] == holder.owner and len(owners) == 2 and owners[1] != holder.owner


def test_the_parent_watch_notices_a_process_that_is_not_our_parent() -> None:
    """The portable path (no parent-death signal): a watched pid that dies, even as an unreaped zombie."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stopped = threading.Event()
    watch_parent(sleeper.pid, stopped.set, interval_s=0.05, grace_s=3600)
    time.sleep(0.3)
    assert not stopped.is_set() and parent_alive(sleeper.pid, direct=False)
    sleeper.kill()  # not reaped yet: a zombie still answers kill(pid, 0)
    assert stopped.wait(5)
    sleeper.wait()
