"""Tasks, models and service calls; wait_for_task's published / live (read-your-writes) conditions."""

from __future__ import annotations

import fmlora_client as fc
import httpx
import pytest

from .mock_server import envelope, models_body, task_body


def test_get_task_and_list_tasks(make_client, server):
    full = task_body("t1", "training", progress={"epoch": 1, "epochs": 3, "loss": 0.5}, classes=["robin"])
    server.on("GET", "/tasks/t1", httpx.Response(200, json=full))
    server.on("GET", "/tasks", httpx.Response(200, json={"tasks": [task_body("t2", "live", 2), full]}))
    client = make_client()
    task = client.get_task("t1")
    assert isinstance(task, fc.TaskInfo)
    assert task.status == "training" and task.progress["epoch"] == 1 and task.classes == ["robin"]
    assert not task.done and not task.succeeded
    tasks = client.list_tasks(limit=10, status="live")
    assert [t.id for t in tasks] == ["t2", "t1"] and tasks[0].done and tasks[0].succeeded
    assert dict(server.calls("GET", "/tasks")[0].url.params) == {"limit": "10", "status": "live"}
    client.list_tasks()
    assert server.calls("GET", "/tasks")[1].url.query == b""


def test_task_ids_are_quoted_into_the_path(make_client, server):
    server.on("GET", "/tasks/a/b", httpx.Response(200, json=task_body("a/b")))
    assert make_client().get_task("a/b").id == "a/b"
    assert server.requests[-1].url.raw_path == b"/tasks/a%2Fb"
    with pytest.raises(fc.InvalidInputError):
        make_client().get_task("")


def test_missing_task_raises_not_found(make_client, server):
    server.on("GET", "/tasks/zz", envelope(404, "task_not_found", "no task zz"))
    with pytest.raises(fc.NotFoundError, match="no task zz"):
        make_client().get_task("zz")


def test_models_and_activate(make_client, server):
    server.on("GET", "/models", httpx.Response(200, json=models_body(2, 2, {1: ["a"], 2: ["a", "b"]})))
    version = {"version": 1, "sha256": "s1", "state": "live", "tasks": ["a"], "card": {"final_accuracy": 0.9}}
    server.on("POST", "/models/1/activate", httpx.Response(200, json={"live": 1, "serving": 1, "version": version}))
    client = make_client(admin_key="adm", api_key="api")
    models = client.models()
    assert models.live == 2 and models.serving == 2
    assert models.get(2).tasks == ["a", "b"] and models.get(9) is None
    result = client.activate(1)
    assert isinstance(result, fc.Activation)
    assert result.live == 1 and result.serving == 1 and result.version.card["final_accuracy"] == 0.9
    assert result.warning is None
    assert server.requests[-1].headers["authorization"] == "Bearer adm"


@pytest.mark.parametrize(
    ("body", "live"),
    [(None, 5), ({"version": 5, "state": "live"}, 5), ({"live": 5, "serving": 4, "warning": "lagging"}, 5)],
)
def test_activate_tolerates_other_answers(make_client, server, body, live):
    server.on("POST", "/models/5/activate", httpx.Response(200, json=body) if body else httpx.Response(204))
    assert make_client().activate(5).live == live


def test_activate_validates_and_maps_conflicts(make_client, server):
    with pytest.raises(fc.InvalidInputError):
        make_client().activate(None)
    server.on("POST", "/models/3/activate", envelope(409, "version_state", "version 3 is rejected"))
    with pytest.raises(fc.ConflictError):
        make_client().activate(3)


def test_health_info_ready(make_client, server):
    server.on("GET", "/healthz", httpx.Response(200, json={"status": "ok"}))
    info = {"name": "fmlora", "version": "0.1.0", "backbone": "vit", "ready": True, "serving_version": 2, "x": 1}
    server.on("GET", "/info", httpx.Response(200, json=info))
    server.on("GET", "/readyz", httpx.Response(200, json={"status": "ready", "serving_version": 2}))
    client = make_client()
    assert client.health() == fc.Health(status="ok")
    got = client.info()
    assert got.serving_version == 2 and got.backbone == "vit" and got.model_extra == {"x": 1}
    assert client.ready() is True


def test_ready_raises_for_other_failures(make_client, server):
    server.on("GET", "/readyz", envelope(401, "unauthorized"))
    with pytest.raises(fc.AuthenticationError):
        make_client().ready()


def test_wait_ready_rides_over_connection_errors_and_503(make_client, server, sleeps):
    server.on(
        "GET",
        "/readyz",
        httpx.ConnectError("refused"),
        envelope(503, "not_ready"),
        httpx.Response(200, json={"status": "ready"}),
    )
    make_client(max_retries=0).wait_ready(timeout=10, poll_interval=0.5)
    assert len(server.calls("GET", "/readyz")) == 3 and sleeps.delays == [0.5, 0.5]


def test_wait_ready_times_out(make_client, server, sleeps):
    server.on("GET", "/readyz", envelope(503, "not_ready"))
    with pytest.raises(fc.WaitTimeoutError, match="not ready after 2s"):
        make_client().wait_ready(timeout=2, poll_interval=0.5)
    assert sum(sleeps.delays) == pytest.approx(2.0)


# -- wait_for_task ---------------------------------------------------------------------------------------------


def test_wait_until_published(make_client, server, sleeps):
    server.on(
        "GET",
        "/tasks/t1",
        httpx.Response(200, json=task_body("t1", "queued")),
        httpx.Response(200, json=task_body("t1", "training", progress={"epoch": 1})),
        httpx.Response(200, json=task_body("t1", "live", 4)),
    )
    seen = []
    task = make_client().wait_for_task("t1", until="published", poll_interval=2, on_update=seen.append)
    assert task.status == "live" and task.version == 4
    assert [t.status for t in seen] == ["queued", "training", "live"]
    assert sleeps.delays == [2, 2]
    assert server.calls("GET", "/models") == []  # published needs no read-your-writes check


def test_on_update_reports_changes_only(make_client, server, sleeps):
    queued = httpx.Response(200, json=task_body("t1", "queued"))
    server.on("GET", "/tasks/t1", queued, queued, queued, httpx.Response(200, json=task_body("t1", "live", 1)))
    server.on("GET", "/models", httpx.Response(200, json=models_body(1, 1, {1: ["birds"]})))
    seen = []
    make_client().wait_for_task("t1", on_update=seen.append)
    assert [t.status for t in seen] == ["queued", "live"]


def test_wait_until_live_waits_for_the_serving_replica(make_client, server, sleeps):
    """The registry already says live, but this replica still serves the previous version: keep waiting."""
    server.on("GET", "/tasks/t1", httpx.Response(200, json=task_body("t1", "live", 5)))
    server.on(
        "GET",
        "/models",
        httpx.Response(200, json=models_body(5, 4, {4: ["a"], 5: ["a", "birds"]})),
        httpx.Response(200, json=models_body(5, None, {4: ["a"], 5: ["a", "birds"]})),
        httpx.Response(200, json=models_body(5, 5, {4: ["a"], 5: ["a", "birds"]})),
    )
    task = make_client().wait_for_task("t1", until="live", poll_interval=1)
    assert task.version == 5
    assert len(server.calls("GET", "/models")) == 3 and sleeps.delays == [1, 1]


def test_wait_until_live_waits_for_the_live_pointer(make_client, server, sleeps):
    server.on("GET", "/tasks/t1", httpx.Response(200, json=task_body("t1", "live", 5)))
    server.on(
        "GET",
        "/models",
        httpx.Response(200, json=models_body(4, 4, {4: ["a"], 5: ["a", "birds"]})),
        httpx.Response(200, json=models_body(5, 5, {4: ["a"], 5: ["a", "birds"]})),
    )
    assert make_client().wait_for_task("t1").version == 5
    assert len(server.calls("GET", "/models")) == 2


def test_wait_until_live_accepts_a_newer_live_version_that_holds_the_task(make_client, server, sleeps):
    server.on("GET", "/tasks/t1", httpx.Response(200, json=task_body("t1", "live", 5, name="birds")))
    server.on("GET", "/models", httpx.Response(200, json=models_body(6, 6, {5: ["birds"], 6: ["birds", "fish"]})))
    assert make_client().wait_for_task("t1").version == 5


def test_wait_until_live_rejects_a_newer_live_version_without_the_task(make_client, server, sleeps):
    server.on("GET", "/tasks/t1", httpx.Response(200, json=task_body("t1", "live", 5, name="birds")))
    server.on("GET", "/models", httpx.Response(200, json=models_body(6, 6, {5: ["birds"], 6: ["fish"]})))
    with pytest.raises(fc.WaitTimeoutError) as info:
        make_client().wait_for_task("t1", timeout=3, poll_interval=1)
    assert info.value.last.version == 5


@pytest.mark.parametrize(("status", "cls"), [("rejected", fc.TaskRejectedError), ("failed", fc.TaskFailedError)])
def test_wait_raises_when_the_task_ends_badly(make_client, server, sleeps, status, cls):
    server.on(
        "GET",
        "/tasks/t1",
        httpx.Response(200, json=task_body("t1", "training")),
        httpx.Response(200, json=task_body("t1", status, 3 if status == "rejected" else None, error="accuracy 0.1")),
    )
    with pytest.raises(cls, match=r"accuracy 0\.1") as info:
        make_client().wait_for_task("t1", until="published")
    assert type(info.value) is cls
    assert info.value.task.status == status


def test_wait_times_out_with_the_last_state(make_client, server, sleeps):
    server.on("GET", "/tasks/t1", httpx.Response(200, json=task_body("t1", "training")))
    with pytest.raises(fc.WaitTimeoutError, match="not live after 5s") as info:
        make_client().wait_for_task("t1", timeout=5, poll_interval=2)
    assert info.value.last.status == "training"
    assert sleeps.delays == [2, 2, 1]  # never sleeps past the deadline


def test_wait_validates_arguments(make_client):
    client = make_client()
    with pytest.raises(fc.InvalidInputError):
        client.wait_for_task("t1", until="done")
    with pytest.raises(fc.InvalidInputError):
        client.wait_for_task("t1", poll_interval=0)


def test_wait_polls_through_transient_errors(make_client, server, sleeps):
    server.on(
        "GET",
        "/tasks/t1",
        envelope(503, "not_ready"),
        httpx.ConnectError("blip"),
        httpx.Response(200, json=task_body("t1", "live", 1)),
    )
    assert make_client().wait_for_task("t1", until="published").version == 1
