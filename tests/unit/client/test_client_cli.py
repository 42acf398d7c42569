"""CLI commands through typer's CliRunner with a mock transport: tables by default, --json, exit codes."""

from __future__ import annotations

import json

import httpx
import pytest
import typer
from fmlora_client import Client, cli
from typer.testing import CliRunner

from .mock_server import Server, envelope, form_fields, models_body, task_body


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def wired(monkeypatch, server: Server, sleeps) -> Server:
    """Every command's Client talks to the scripted server; sleeps are instant."""
    made = []

    def make_client(url=None, api_key=None, admin_key=None, timeout=None):
        client = Client(url or "http://fmlora.test", api_key=api_key, admin_key=admin_key, transport=server.transport())
        client._sleep = sleeps.sleep
        client._clock = sleeps.clock
        made.append({"url": url, "api_key": api_key, "admin_key": admin_key, "timeout": timeout})
        return client

    monkeypatch.setattr(cli, "make_client", make_client)
    server.made = made  # type: ignore[attr-defined]
    return server


def _image(tmp_path, name="robin.png"):
    path = tmp_path / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + name.encode())
    return path


def test_register_adds_the_commands_to_any_app(runner):
    app = typer.Typer()

    @app.command("version")
    def version() -> None:
        """the host app's own command"""

    cli.register(app)
    names = {c.name for c in app.registered_commands}
    assert {"predict", "submit", "tasks", "models", "activate", "version"} <= names
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "predict" in result.output and "activate" in result.output


def test_predict_table(runner, wired, tmp_path):
    a, b = _image(tmp_path, "a.png"), _image(tmp_path, "b.png")
    body = {
        "model_version": 3,
        "snapshot_sha256": "abcdef0123456789",
        "results": [
            {"predictions": [{"label": "robin", "score": 0.93, "task": "birds"}, {"label": "wren", "score": 0.05}]},
            {"predictions": [{"label": "trout", "score": 0.5, "task": "fish"}]},
        ],
    }
    wired.on("POST", "/predict", httpx.Response(200, json=body))
    result = runner.invoke(cli.app, ["predict", str(a), str(b), "--top-k", "2", "--prompt", "birds", "--api-key", "k"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "model version 3 (sha256 abcdef012345)"
    assert lines[1].split() == ["IMAGE", "#", "LABEL", "SCORE", "TASK"]
    assert lines[2].split() == [str(a), "1", "robin", "0.930", "birds"]
    assert lines[3].split() == ["2", "wren", "0.050"]
    assert lines[4].split() == [str(b), "1", "trout", "0.500", "fish"]
    fields = form_fields(wired.requests[-1])
    assert fields["top_k"] == "2" and json.loads(fields["prompt"]) == {"task": "birds"}
    assert wired.made[-1]["api_key"] == "k"


def test_predict_json(runner, wired, tmp_path):
    body = {"model_version": 1, "snapshot_sha256": None, "results": [{"predictions": [{"label": "x", "score": 1.0}]}]}
    wired.on("POST", "/predict", httpx.Response(200, json=body))
    result = runner.invoke(cli.app, ["predict", str(_image(tmp_path)), "--json", "--prompt", "none", "--version", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model_version"] == 1 and data["results"][0]["predictions"][0]["label"] == "x"
    assert data["results"][0]["model_version"] == 1
    assert form_fields(wired.requests[-1])["prompt"] == "none"
    assert form_fields(wired.requests[-1])["version"] == "1"


def test_predict_missing_file_is_a_usage_error(runner, wired, tmp_path):
    result = runner.invoke(cli.app, ["predict", str(tmp_path / "absent.png")])
    assert result.exit_code == 2
    assert wired.requests == []


def test_api_errors_exit_1_with_a_message(runner, wired, tmp_path):
    wired.on("POST", "/predict", envelope(422, "unknown_task", "no task named fish", "rid-7"))
    result = runner.invoke(cli.app, ["predict", str(_image(tmp_path)), "--prompt", "task:fish"])
    assert result.exit_code == 1
    assert "error: 422 unknown_task: no task named fish (request id rid-7)" in result.output


def test_connection_errors_exit_1(runner, wired, tmp_path):
    wired.on("GET", "/models", httpx.ConnectError("refused"))
    result = runner.invoke(cli.app, ["models"])
    assert result.exit_code == 1 and "error: connection error" in result.output


def test_submit(runner, wired, tmp_path):
    (tmp_path / "birds" / "robin").mkdir(parents=True)
    (tmp_path / "birds" / "robin" / "1.png").write_bytes(b"img")
    wired.on("POST", "/tasks", httpx.Response(202, json={"id": "t1", "status": "queued", "url": "/tasks/t1"}))
    result = runner.invoke(cli.app, ["submit", str(tmp_path / "birds"), "--admin-key", "adm"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "submitted task t1 (queued)"
    request = wired.requests[-1]
    assert form_fields(request) == {"name": "birds", "kind": "class"}  # the name defaults to the folder's
    assert request.headers["authorization"] == "Bearer adm"
    result = runner.invoke(cli.app, ["submit", str(tmp_path / "birds"), "--name", "b2", "--kind", "domain", "--json"])
    assert json.loads(result.output) == {"id": "t1", "status": "queued", "url": "/tasks/t1", "replayed": False}
    assert form_fields(wired.requests[-1]) == {"name": "b2", "kind": "domain"}


def test_submit_wait_follows_the_task_until_live(runner, wired, tmp_path):
    (tmp_path / "robin").mkdir()
    (tmp_path / "robin" / "1.png").write_bytes(b"img")
    wired.on("POST", "/tasks", httpx.Response(202, json={"id": "t1", "status": "queued"}))
    wired.on(
        "GET",
        "/tasks/t1",
        httpx.Response(200, json=task_body("t1", "training", progress={"epoch": 1, "epochs": 2, "loss": 0.25})),
        httpx.Response(200, json=task_body("t1", "live", 2, classes=["robin"])),
    )
    wired.on("GET", "/models", httpx.Response(200, json=models_body(2, 2, {2: ["birds"]})))
    result = runner.invoke(cli.app, ["submit", str(tmp_path), "--name", "birds", "--wait"])
    assert result.exit_code == 0, result.output
    assert "training epoch 1/2 loss 0.2500" in result.output
    assert "status    live" in result.output and "version   2" in result.output


def test_submit_wait_reports_rejection(runner, wired, tmp_path):
    (tmp_path / "robin").mkdir()
    (tmp_path / "robin" / "1.png").write_bytes(b"img")
    wired.on("POST", "/tasks", httpx.Response(202, json={"id": "t1", "status": "queued"}))
    wired.on("GET", "/tasks/t1", httpx.Response(200, json=task_body("t1", "rejected", 2, error="accuracy too low")))
    result = runner.invoke(cli.app, ["submit", str(tmp_path), "--name", "birds", "--wait", "--json"])
    assert result.exit_code == 1
    assert "ended rejected: accuracy too low" in result.output


def test_submit_rejects_bad_options(runner, wired, tmp_path):
    assert runner.invoke(cli.app, ["submit", str(tmp_path), "--kind", "other"]).exit_code == 2
    assert runner.invoke(cli.app, ["submit", str(tmp_path), "--wait", "--until", "soon"]).exit_code == 2
    assert wired.requests == []


def test_tasks_table_json_and_detail(runner, wired):
    tasks = [
        task_body("t2", "training", progress={"epoch": 2, "epochs": 5, "step": 10, "steps": 50}),
        task_body("t1", "failed", error="archive had one class\nonly"),
    ]
    wired.on("GET", "/tasks", httpx.Response(200, json={"tasks": tasks}))
    wired.on("GET", "/tasks/t2", httpx.Response(200, json={**tasks[0], "metrics": {"accuracy": 0.875}}))
    result = runner.invoke(cli.app, ["tasks"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["ID", "NAME", "KIND", "STATUS", "VERSION", "PROGRESS", "ERROR"]
    assert lines[1].split() == ["t2", "birds", "class", "training", "epoch", "2/5", "step", "10/50"]
    assert lines[2].split()[:4] == ["t1", "birds", "class", "failed"]
    assert "archive had one class only" in lines[2]
    data = json.loads(runner.invoke(cli.app, ["tasks", "--json", "--status", "failed", "--limit", "3"]).output)
    assert [t["id"] for t in data] == ["t2", "t1"]
    assert dict(wired.calls("GET", "/tasks")[-1].url.params) == {"limit": "3", "status": "failed"}
    detail = runner.invoke(cli.app, ["tasks", "t2"]).output
    assert "id        t2" in detail and "metric    accuracy = 0.8750" in detail


def test_tasks_empty(runner, wired):
    wired.on("GET", "/tasks", httpx.Response(200, json={"tasks": []}))
    assert runner.invoke(cli.app, ["tasks"]).output.strip() == "no tasks"


def test_models_table_and_json(runner, wired):
    body = models_body(2, 1, {1: ["a"], 2: ["a", "b"]})
    body["versions"][1]["card"] = {"final_accuracy": 0.8125, "average_incremental_accuracy": 0.9, "forgetting": 0.05}
    wired.on("GET", "/models", httpx.Response(200, json=body))
    result = runner.invoke(cli.app, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "live 2  serving 1"
    headers = ["VERSION", "STATE", "SERVED", "TASKS", "FINAL_ACC", "AVG_INC_ACC", "FORGETTING", "SHA256"]
    assert lines[1].split() == headers
    assert lines[2].split() == ["1", "retired", "*", "a", "sha-1"]
    assert lines[3].split() == ["2", "live", "a,", "b", "0.8125", "0.9000", "0.0500", "sha-2"]
    data = json.loads(runner.invoke(cli.app, ["models", "--json"]).output)
    assert data["live"] == 2 and len(data["versions"]) == 2


def test_activate(runner, wired):
    wired.on("POST", "/models/1/activate", httpx.Response(200, json={"live": 1, "serving": 1}))
    result = runner.invoke(cli.app, ["activate", "1", "--admin-key", "adm"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "version 1 is live; this server serves 1"
    assert wired.requests[-1].headers["authorization"] == "Bearer adm"
    wired.on("POST", "/models/1/activate", httpx.Response(200, json={"live": 1, "serving": 2, "warning": "lagging"}))
    result = runner.invoke(cli.app, ["activate", "1"])
    assert "warning: lagging" in result.output
    data = json.loads(runner.invoke(cli.app, ["activate", "1", "--json"]).output)
    assert data["live"] == 1 and data["warning"] == "lagging"


def test_activate_conflict(runner, wired):
    wired.on("POST", "/models/3/activate", envelope(409, "version_state", "version 3 was rejected"))
    result = runner.invoke(cli.app, ["activate", "3"])
    assert result.exit_code == 1 and "409 version_state: version 3 was rejected" in result.output


def test_environment_reaches_the_client(runner, wired, monkeypatch):
    monkeypatch.setenv("FMLORA_URL", "http://from-env.test")
    monkeypatch.setenv("FMLORA_API_KEY", "env-key")
    wired.on("GET", "/models", httpx.Response(200, json=models_body(None, None)))
    result = runner.invoke(cli.app, ["models", "--timeout", "4"])
    assert result.exit_code == 0, result.output
    assert wired.made[-1] == {"url": "http://from-env.test", "api_key": "env-key", "admin_key": None, "timeout": 4.0}
    assert str(wired.requests[-1].url) == "http://from-env.test/models"
    assert "no versions" in result.output


def test_make_client_builds_a_real_client():
    client = cli.make_client("http://x.test", "a", "b", 2.5)
    try:
        assert client.base_url == "http://x.test" and client.timeout.read == 2.5
        assert client.settings.api_key == "a" and client.settings.admin_key == "b"
    finally:
        client.close()
