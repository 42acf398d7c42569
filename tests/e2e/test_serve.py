"""End to end: a real ``python -m server serve`` (uvicorn) on 127.0.0.1, a free port, a tiny model in a
temp FMLORA_HOME. Ready, predict, SIGTERM with requests in flight (they complete, exit 0), and the
embedded worker learning an uploaded task until it is live and predicted."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.e2e._homes import tiny_home

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "e2e-admin-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(color: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (size, size), color)
    for x in range(0, size, 4):  # a little structure, so classes differ beyond their colour
        img.putpixel((x, x), (255 - color[0], 255 - color[1], 255 - color[2]))
    img.save(buf, format="PNG")
    return buf.getvalue()


class Server:
    def __init__(self, home: Path, log: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        environment = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE",
            "HF_HUB_OFFLINE": "1",
            "FMLORA_ADMIN_KEY": ADMIN,
            "FMLORA_DEVICE": "cpu",
            "FMLORA_POLL_INTERVAL_S": "0.1",
            **(env or {}),
        }
        command = [sys.executable, "-m", "server", "serve", "--home", str(home), "--port", str(self.port), *extra]
        self._log = log.open("wb")
        self.process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=self._log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


@pytest.fixture
def tiny_served_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    tiny_home(home, {"pets": ["cat", "dog"]})
    return home


def test_serve_answers_then_sigterm_lets_in_flight_requests_finish(tiny_served_home, tmp_path):
    # A long batching window keeps requests in flight for a while: SIGTERM arrives while they wait.
    server = Server(
        tiny_served_home,
        tmp_path / "server.log",
        "--no-worker",
        env={"FMLORA_MAX_WAIT_MS": "3000", "FMLORA_MAX_BATCH_SIZE": "64", "FMLORA_SHUTDOWN_TIMEOUT_S": "20"},
    )
    try:
        server.wait_ready()
        banner = server.output()
        assert f"API:       {server.url}" in banner and f"{server.url}/docs" in banner
        assert ADMIN not in banner  # a key set in the environment is never printed in full

        image = base64.b64encode(png((200, 30, 30))).decode()
        r = httpx.post(f"{server.url}/predict", json={"images": [image]}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == 1
        assert {p["label"] for p in r.json()["results"][0]["predictions"]} == {"cat", "dog"}
        assert r.headers["x-request-id"]
        assert httpx.get(f"{server.url}/docs", timeout=5).status_code == 200

        results: list[int | str] = []

        def call() -> None:
            try:
                resp = httpx.post(f"{server.url}/predict", json={"images": [image, image]}, timeout=60)
                results.append(resp.status_code)
            except httpx.HTTPError as exc:
                results.append(type(exc).__name__)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        # Wait until all 8 images wait in the batcher (so the 4 requests are truly in flight).
        deadline = time.monotonic() + 30
        while "fmlora_queue_depth 8.0" not in httpx.get(f"{server.url}/metrics", timeout=5).text:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.02)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        code = server.process.wait(60)  # one SIGTERM only: a second one would be a forced stop
        assert results == [200, 200, 200, 200], server.output()
        assert code == 0, server.output()
        assert time.monotonic() - started < 30
        out = server.output()
        assert "engine stopped (drained)" in out and "fmlora stopped" in out
        assert "Traceback" not in out
    finally:
        server.kill()


def zip_task(classes: dict[str, tuple[int, int, int]], per_class: int = 6) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for cls, color in classes.items():
            for i in range(per_class):
                shade = tuple(max(0, min(255, c + 9 * i - 20)) for c in color)
                zf.writestr(f"{cls}/{i}.png", png(shade))  # type: ignore[arg-type]
    return buf.getvalue()


def test_serve_with_embedded_worker_learns_an_uploaded_task(tmp_path):
    home = tmp_path / "home"
    tiny_home(home)  # nothing learned yet: predictions answer 503 no_model until the task is live
    server = Server(
        home,
        tmp_path / "server.log",
        env={"FMLORA_WORKER_EPOCHS": "1", "FMLORA_WORKER_BATCH_SIZE": "8", "FMLORA_WORKER_DEVICE": "cpu"},
    )
    try:
        server.wait_ready()
        image = base64.b64encode(png((200, 40, 40))).decode()
        r = httpx.post(f"{server.url}/predict", json={"images": [image]}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "no_model"
        headers = {"Authorization": f"Bearer {ADMIN}", "Idempotency-Key": "e2e-birds-1"}
        archive = zip_task({"robin": (200, 40, 40), "crow": (20, 20, 20)})
        files = {"archive": ("birds.zip", archive, "application/zip")}
        r = httpx.post(f"{server.url}/tasks", files=files, data={"name": "birds"}, headers=headers, timeout=60)
        assert r.status_code == 202, r.text
        task_url = server.url + r.headers["location"]
        again = httpx.post(f"{server.url}/tasks", files=files, data={"name": "birds"}, headers=headers, timeout=60)
        assert again.status_code == 200 and again.json()["id"] == r.json()["id"]

        deadline = time.monotonic() + 120
        task = {}
        while time.monotonic() < deadline:
            task = httpx.get(task_url, timeout=5).json()
            if task["status"] in ("live", "rejected", "failed"):
                break
            time.sleep(0.2)
        assert task["status"] == "live", (task, server.output()[-3000:])
        version = task["version"]

        deadline = time.monotonic() + 10  # this replica follows the live pointer within its poll interval
        while httpx.get(f"{server.url}/models", timeout=5).json()["serving"] != version:
            assert time.monotonic() < deadline, server.output()[-3000:]
            time.sleep(0.1)
        r = httpx.post(f"{server.url}/predict", json={"images": [image], "top_k": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["model_version"] == version
        assert {p["label"] for p in r.json()["results"][0]["predictions"]} == {"robin", "crow"}
        assert server.stop(signal.SIGINT) == 0, server.output()
        assert "Traceback" not in server.output()
    finally:
        server.kill()


def _worker_pids(server_pid: int) -> list[int]:
    """The embedded workers started by ``server_pid`` (their command names it as --parent-pid)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"worker" in argv
            and b"--parent-pid" in argv
            and argv[argv.index(b"--parent-pid") + 1] == str(server_pid).encode()
        ):
            found.append(int(entry.name))
    return found


def test_sigkill_of_serve_takes_its_worker_down_and_the_next_server_finishes_the_task(tmp_path):
    home = tmp_path / "home"
    registry, _ = tiny_home(home)
    worker_env = {"FMLORA_WORKER_BATCH_SIZE": "8", "FMLORA_WORKER_DEVICE": "cpu"}
    first = Server(home, tmp_path / "first.log", env={**worker_env, "FMLORA_WORKER_EPOCHS": "400"})
    second = None
    try:
        first.wait_ready()
        headers = {"Authorization": f"Bearer {ADMIN}"}
        files = {"archive": ("birds.zip", zip_task({"robin": (200, 40, 40), "crow": (20, 20, 20)}), "application/zip")}
        r = httpx.post(f"{first.url}/tasks", files=files, data={"name": "birds"}, headers=headers, timeout=60)
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]
        deadline = time.monotonic() + 60
        while registry.get_task(task_id).status != "training":
            assert time.monotonic() < deadline, first.output()[-3000:]
            time.sleep(0.1)
        workers = _worker_pids(first.process.pid)
        assert len(workers) == 1, workers

        first.process.kill()  # SIGKILL: no handler runs in the server
        first.process.wait(10)
        deadline = time.monotonic() + 10
        while _worker_pids(first.process.pid):  # a zombie has no command line: gone counts
            assert time.monotonic() < deadline, "the embedded worker outlived its server"
            time.sleep(0.1)

        second = Server(home, tmp_path / "second.log", env={**worker_env, "FMLORA_WORKER_EPOCHS": "1"})
        second.wait_ready()
        deadline = time.monotonic() + 120
        while registry.get_task(task_id).status not in ("live", "rejected", "failed"):
            assert time.monotonic() < deadline, second.output()[-3000:]
            time.sleep(0.2)
        assert registry.get_task(task_id).status == "live", second.output()[-3000:]
        assert [v.version for v in registry.list_versions() if v.task_id == task_id] == [
            registry.get_task(task_id).version
        ]
        assert second.stop(signal.SIGINT) == 0, second.output()
    finally:
        first.kill()
        if second is not None:
            second.kill()
