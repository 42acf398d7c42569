"""AsyncClient: the same calls, retries, errors and conditions as Client (run with asyncio.run)."""

from __future__ import annotations

import asyncio
import inspect

import fmlora_client as fc
import httpx
import pytest
from fmlora_client import AsyncClient, Client

from .mock_server import envelope, form_fields, models_body, multipart_parts, prediction_body, task_body

PUBLIC = ["predict", "submit_task", "get_task", "list_tasks", "wait_for_task", "models", "activate", "health",
          "ready", "wait_ready", "info"]  # fmt: skip


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("name", PUBLIC)
def test_same_methods_and_parameters(name):
    sync, asynchronous = getattr(Client, name), getattr(AsyncClient, name)
    assert inspect.iscoroutinefunction(asynchronous)
    sync_params = list(inspect.signature(sync).parameters)
    async_params = list(inspect.signature(asynchronous).parameters)
    extra = [p for p in async_params if p not in sync_params]
    assert extra == (["concurrency"] if name == "predict" else [])
    assert [p for p in async_params if p in sync_params] == sync_params


def test_predict_batches_in_order_with_versions(make_async_client, server):
    calls = {"n": 0}

    def handler(request):
        images = [payload for name, _, payload in multipart_parts(request) if name == "images"]
        version = 1 if calls["n"] == 0 else 2
        calls["n"] += 1
        results = [{"predictions": [{"label": img.decode(), "score": 1.0}]} for img in images]
        return httpx.Response(200, json={"model_version": version, "snapshot_sha256": None, "results": results})

    server.on("POST", "/predict", handler)

    async def go():
        async with make_async_client(api_key="k") as client:
            return await client.predict([f"{i}".encode() for i in range(5)], batch_size=2, top_k=2)

    result = run(go())
    assert result.labels == ["0", "1", "2", "3", "4"]
    assert [r.model_version for r in result.results] == [1, 1, 2, 2, 2]
    assert form_fields(server.requests[0]) == {"top_k": "2", "prompt": "auto"}
    assert server.requests[0].headers["authorization"] == "Bearer k"


def test_concurrent_batches_keep_input_order(make_async_client, server):
    in_flight = {"now": 0, "max": 0}

    async def handler(request):
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])
        images = [payload for name, _, payload in multipart_parts(request) if name == "images"]
        await asyncio.sleep(0.01 * (5 - int(images[0].decode()) % 5))  # later batches finish first
        in_flight["now"] -= 1
        results = [{"predictions": [{"label": img.decode(), "score": 1.0}]} for img in images]
        return httpx.Response(200, json={"model_version": 1, "snapshot_sha256": None, "results": results})

    async def go():
        client = AsyncClient("http://fmlora.test", transport=httpx.MockTransport(handler))
        async with client:
            return await client.predict([f"{i}".encode() for i in range(10)], batch_size=1, concurrency=3)

    result = run(go())
    assert result.labels == [str(i) for i in range(10)]
    assert in_flight["max"] == 3


def test_concurrent_failure_raises_the_plain_error(make_async_client, server):
    server.on(
        "POST",
        "/predict",
        lambda r: (
            envelope(422, "unknown_task", "no task fish")
            if b"bad" in r.read()
            else httpx.Response(200, json=prediction_body(1))
        ),
    )

    async def go():
        async with make_async_client() as client:
            await client.predict([b"ok", b"bad", b"ok"], batch_size=1, concurrency=2)

    with pytest.raises(fc.UnprocessableEntityError, match="no task fish"):
        run(go())


def test_retries_honour_retry_after_and_skip_non_idempotent(make_async_client, server, sleeps):
    limited = envelope(429, "queue_full", **{"Retry-After": "2"})
    server.on("GET", "/models", limited, httpx.Response(200, json=models_body(1, 1)))
    server.on("POST", "/models/1/activate", envelope(503, None))

    async def go():
        async with make_async_client() as client:
            models = await client.models()
            with pytest.raises(fc.ServiceUnavailableError):
                await client.activate(1)
            return models

    assert run(go()).live == 1
    assert len(server.calls("GET", "/models")) == 2 and sleeps.delays == [2.0]
    assert len(server.calls("POST", "/models/1/activate")) == 1


def test_connection_errors_map_and_retry(make_async_client, server, sleeps):
    server.on("GET", "/healthz", httpx.ConnectError("refused"), httpx.Response(200, json={"status": "ok"}))
    server.on("GET", "/info", httpx.ReadTimeout("slow"))

    async def go():
        async with make_async_client(max_retries=1) as client:
            assert (await client.health()).status == "ok"
            with pytest.raises(fc.APITimeoutError):
                await client.info()

    run(go())
    assert len(server.calls("GET", "/info")) == 2


def test_submit_reuses_its_key_across_retries(make_async_client, server, sleeps, tmp_path):
    (tmp_path / "robin").mkdir()
    (tmp_path / "robin" / "1.png").write_bytes(b"img")
    accepted = httpx.Response(202, json={"id": "t1", "status": "queued", "url": "/tasks/t1"})
    server.on("POST", "/tasks", httpx.ReadError("reset"), accepted)

    async def go():
        async with make_async_client(admin_key="adm") as client:
            return await client.submit_task(tmp_path, name="birds", kind="domain")

    assert run(go()).id == "t1"
    calls = server.calls("POST", "/tasks")
    assert len(calls) == 2 and calls[0].headers["idempotency-key"] == calls[1].headers["idempotency-key"]
    assert multipart_parts(calls[0]) == multipart_parts(calls[1])
    assert form_fields(calls[1]) == {"name": "birds", "kind": "domain"}


def test_wait_for_task_live_and_failures(make_async_client, server, sleeps):
    server.on(
        "GET",
        "/tasks/t1",
        httpx.Response(200, json=task_body("t1", "training")),
        httpx.Response(200, json=task_body("t1", "live", 2)),
    )
    server.on(
        "GET",
        "/models",
        httpx.Response(200, json=models_body(2, 1, {1: ["a"], 2: ["a", "birds"]})),
        httpx.Response(200, json=models_body(2, 2, {1: ["a"], 2: ["a", "birds"]})),
    )
    server.on("GET", "/tasks/t2", httpx.Response(200, json=task_body("t2", "rejected", 3, error="gate")))
    server.on("GET", "/tasks/t3", httpx.Response(200, json=task_body("t3", "queued")))

    async def go():
        async with make_async_client() as client:
            task = await client.wait_for_task("t1", poll_interval=1)
            with pytest.raises(fc.TaskRejectedError):
                await client.wait_for_task("t2")
            with pytest.raises(fc.WaitTimeoutError):
                await client.wait_for_task("t3", timeout=2, poll_interval=1)
            return task

    assert run(go()).version == 2
    assert len(server.calls("GET", "/models")) == 2


def test_tasks_ready_and_lifecycle(make_async_client, server, sleeps):
    server.on("GET", "/tasks", httpx.Response(200, json={"tasks": [task_body("t1")]}))
    server.on("GET", "/readyz", httpx.ConnectError("down"), envelope(503, "not_ready"), httpx.Response(200, json={}))

    async def go():
        client = make_async_client()
        async with client:
            assert [t.id for t in await client.list_tasks(limit=5)] == ["t1"]
            await client.wait_ready(timeout=5, poll_interval=0.5)
        return client

    client = run(go())
    assert client.is_closed
    assert dict(server.calls("GET", "/tasks")[0].url.params) == {"limit": "5"}
    assert len(server.calls("GET", "/readyz")) == 3


def test_injected_async_http_client_is_not_closed():
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"status": "ok"})))

    async def go():
        async with AsyncClient(http_client=http) as client:
            await client.health()
        assert not http.is_closed
        await http.aclose()

    run(go())


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_reading_encoding_and_zipping_stay_off_the_event_loop(make_async_client, server, monkeypatch, tmp_path):
    """Opening files, encoding images and zipping a task folder are blocking work: a worker thread does it."""
    from fmlora_client import _archive, _images

    seen: dict[str, list[bool]] = {"encode": [], "zip": []}
    real_encode, real_zip = _images.encode_image, _archive.zip_folder

    def encode(image, index):
        seen["encode"].append(_on_loop())
        return real_encode(image, index)

    def zip_folder(folder, out):
        seen["zip"].append(_on_loop())
        return real_zip(folder, out)

    monkeypatch.setattr(_images, "encode_image", encode)
    monkeypatch.setattr(_archive, "zip_folder", zip_folder)
    server.on("POST", "/predict", lambda request: httpx.Response(200, json=prediction_body(2)))
    server.on("POST", "/tasks", httpx.Response(202, json={"id": "t1", "status": "queued", "url": "/tasks/t1"}))
    for cls in ("a", "b"):
        (tmp_path / "task" / cls).mkdir(parents=True)
        (tmp_path / "task" / cls / "1.png").write_bytes(b"png")

    async def go():
        async with make_async_client(admin_key="k") as client:
            prediction = await client.predict([b"a", b"b", b"c", b"d"], batch_size=2, concurrency=2)
            submission = await client.submit_task(tmp_path / "task", name="t")
            return prediction, submission

    prediction, submission = run(go())
    assert len(prediction.results) == 4 and submission.id == "t1"
    assert seen == {"encode": [False] * 4, "zip": [False]}
