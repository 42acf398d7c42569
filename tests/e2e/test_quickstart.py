"""The quick start, end to end: ``fmlora serve`` (server + embedded worker child) on a free port, two
tasks submitted through the SDK (sync, then async), both live and their classes predicted, then the
demo (``fmlora_demo``, a client of the API) submits a glyph task and measures it, then SIGINT and a
clean exit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fmlora_client import AsyncClient, Client

from fmlora.data import make_synthetic_stream
from fmlora.data.archive import write_task_archive
from fmlora.model import BackboneConfig
from fmlora.registry.registry import Registry
from fmlora_demo import run_demo
from tests.conftest import tiny_config
from tests.e2e.test_serve import free_port

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "quickstart-admin-key-0123456789"


def accuracy(prediction, truth: list[str]) -> float:
    return sum(r.predictions[0].label == t for r, t in zip(prediction.results, truth, strict=True)) / len(truth)


@pytest.mark.timeout(420)
def test_fmlora_serve_learns_two_tasks_through_the_sdk(tmp_path: Path, pretrained_tiny: BackboneConfig) -> None:
    home = tmp_path / "home"
    Registry.open(home, tiny_config(pretrained_tiny))
    stream = make_synthetic_stream(num_tasks=2, classes_per_task=3, train_per_class=16, test_per_class=6, seed=3)
    archives = [write_task_archive(t.train, tmp_path / f"{t.name}.zip") for t in stream]
    held_out = []
    for task in stream:
        images = task.test.images.permute(0, 2, 3, 1).numpy()
        held_out.append((images, [task.test.classes[i] for i in task.test.labels.tolist()]))

    port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "FMLORA_ADMIN_KEY": ADMIN,
        "FMLORA_DEVICE": "cpu",
        "FMLORA_POLL_INTERVAL_S": "0.1",
        "FMLORA_WORKER_EPOCHS": "4",
        "FMLORA_WORKER_BATCH_SIZE": "8",
        "FMLORA_WORKER_LR": "0.003",
    }
    log = (tmp_path / "serve.log").open("wb")
    command = [sys.executable, "-m", "fmlora.cli", "serve", "--home", str(home), "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with Client(url, admin_key=ADMIN) as client:
            client.wait_ready(timeout=120)
            first = client.submit_task(archives[0], name="first", kind="class")
            done = client.wait_for_task(first.id, until="live", timeout=300, poll_interval=0.2)
            prediction = client.predict(held_out[0][0], top_k=3)
            assert prediction.model_version == done.version == 1
            assert {r.predictions[0].label for r in prediction.results} <= set(stream[0].classes)
            assert accuracy(prediction, held_out[0][1]) > 0.6  # chance is 1/3

        async def second_task() -> tuple[int, list]:
            async with AsyncClient(url, admin_key=ADMIN) as aclient:
                submitted = await aclient.submit_task(archives[1], name="second", kind="class")
                task = await aclient.wait_for_task(submitted.id, until="live", timeout=300, poll_interval=0.2)
                answers = [await aclient.predict(images, top_k=1) for images, _ in held_out]
                return task.version, answers

        version, answers = asyncio.run(second_task())
        assert version == 2 and all(a.model_version == 2 for a in answers)
        for answer, (_, truth) in zip(answers, held_out, strict=True):
            assert accuracy(answer, truth) > 0.5  # the old task is kept, the new one learned
        models = Client(url).models()
        assert models.live == models.serving == 2
        assert models.versions[-1].adapter_bytes == models.versions[0].adapter_bytes  # never grows

        # The demo, pointed at this server: the first of 20 glyph tasks (5 classes), measured through the API.
        lines: list[str] = []
        demo = run_demo(
            url,
            ADMIN,
            tmp_path / "demo",
            num_tasks=1,
            stream_tasks=20,
            train_per_class=8,
            test_per_class=4,
            echo=lines.append,
        )
        assert demo.versions == [3] and demo.tasks == ["glyphs-0"]
        assert len(demo.accuracy) == 1 and len(demo.accuracy[0]) == 1 and 0.0 <= demo.accuracy[0][0] <= 1.0
        assert demo.adapter_bytes == [models.versions[0].adapter_bytes]
        assert json.loads((tmp_path / "demo" / "demo.json").read_text())["versions"] == [3]
        assert "\nv3 " in "\n" + "\n".join(lines)  # the accuracy table's row for version 3
        # The clock started with the embedded worker attached (it had trained tasks 1 and 2 already).
        assert demo.seconds_to_worker is not None and demo.seconds_to_worker < 1.0
        assert any(line.startswith("training worker ") and "attached" in line for line in lines)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        code = process.wait(60)
        log.close()
    output = (tmp_path / "serve.log").read_text(errors="replace")
    assert code == 0, output[-3000:]
    assert "Traceback" not in output and "fmlora stopped" in output
    assert Registry.open(home).lease("worker") is None  # the worker child let go cleanly
